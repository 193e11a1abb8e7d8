package main

import (
	"bytes"
	"context"
	"log/slog"
	"regexp"
	"testing"
)

// countingHandler counts WithAttrs calls on the handler it wraps and on those it returns.
type countingHandler struct {
	slog.Handler
	withAttrs *int
}

func (h countingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	*h.withAttrs++
	return countingHandler{h.Handler.WithAttrs(attrs), h.withAttrs}
}

func (h countingHandler) WithGroup(name string) slog.Handler {
	return countingHandler{h.Handler.WithGroup(name), h.withAttrs}
}

var timeField = regexp.MustCompile(`"time":"[^"]*",`)

// Every way a logger is derived writes the same line through the lazy handler as through
// the JSON handler itself.
func TestLazyHandlerWritesWhatTheHandlerWrites(t *testing.T) {
	cases := []struct {
		name string
		log  func(l *slog.Logger)
	}{
		{"no attributes", func(l *slog.Logger) { l.Warn("plain", "k", 1) }},
		{"attributes", func(l *slog.Logger) { l.With("conn", "127.0.0.1:1", "n", 2).Warn("m", "k", "v") }},
		{"nested", func(l *slog.Logger) { l.With("a", 1).With("b", []any{"x", 2}).Error("m") }},
		{"group", func(l *slog.Logger) { l.WithGroup("g").With("a", 1).WithGroup("h").Warn("m", "k", true) }},
		{"empty group", func(l *slog.Logger) { l.WithGroup("").With("a", 1).Warn("m") }},
		{"sibling loggers", func(l *slog.Logger) {
			parent := l.With("p", 1)
			parent.With("c", 1).Warn("first")
			parent.With("c", 2).Warn("second")
			parent.Warn("third")
		}},
		{"same logger twice", func(l *slog.Logger) {
			child := l.With("c", 3)
			child.Warn("one")
			child.Warn("two")
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var direct, lazy bytes.Buffer
			opts := &slog.HandlerOptions{Level: slog.LevelWarn}
			c.log(slog.New(slog.NewJSONHandler(&direct, opts)))
			c.log(slog.New(newLazyHandler(slog.NewJSONHandler(&lazy, opts))))
			want := timeField.ReplaceAllString(direct.String(), "")
			got := timeField.ReplaceAllString(lazy.String(), "")
			if got != want || want == "" {
				t.Fatalf("lazy handler wrote\n%s\nwant\n%s", got, want)
			}
		})
	}
}

// A logger derived for a record below the level formats nothing (what FerretDB does for
// every SQL statement), and one that writes formats its attributes once.
func TestLazyHandlerFormatsOnlyWhatIsWritten(t *testing.T) {
	var out bytes.Buffer
	calls := 0
	base := countingHandler{slog.NewJSONHandler(&out, &slog.HandlerOptions{Level: slog.LevelWarn}), &calls}
	l := slog.New(newLazyHandler(base))

	for i := 0; i < 100; i++ {
		l.With(slog.Any("args", []any{"{\"_id\":\"x\"}", i})).DebugContext(context.Background(), ">>> INSERT")
	}
	if calls != 0 || out.Len() != 0 {
		t.Fatalf("debug records below the level: %d WithAttrs calls, %d bytes written; want none", calls, out.Len())
	}

	child := l.With("conn", 1)
	child.Warn("one")
	child.Warn("two")
	if calls != 1 {
		t.Fatalf("a logger that wrote twice: %d WithAttrs calls, want 1", calls)
	}
}
