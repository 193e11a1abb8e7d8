package main

// FerretDB 1.24 logs every SQL statement it runs at debug level, as
//
//	tx.l.With(slog.Any("args", args)).DebugContext(ctx, ">>> "+query)
//
// (internal/util/fsql), twice per statement. Logger.With calls the handler's WithAttrs before
// DebugContext asks whether debug is enabled, and slog's JSONHandler formats the attributes
// right there: every inserted document's JSON was marshalled once more, only to be dropped.
// Under load that was 8% of FerretDB's CPU (go tool pprof, 2,000 msg/s), plus the garbage.
//
// lazyHandler defers WithAttrs and WithGroup to the first record actually handled, so a
// logger made for a record that is never written costs a slice copy. What is written is
// byte for byte what the wrapped handler writes.

import (
	"context"
	"log/slog"
	"sync"
)

// lazyStep is one deferred WithGroup (group != "") or WithAttrs call.
type lazyStep struct {
	group string
	attrs []slog.Attr
}

type lazyHandler struct {
	base  slog.Handler // the handler as configured, without any deferred step
	steps []lazyStep   // deferred calls, in order

	once  *sync.Once
	built *slog.Handler // base with the steps applied, made once on the first Handle
}

func newLazyHandler(base slog.Handler) *lazyHandler {
	return &lazyHandler{base: base, once: new(sync.Once), built: new(slog.Handler)}
}

// Enabled does not depend on attributes or groups (true of slog's own handlers).
func (h *lazyHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return h.base.Enabled(ctx, level)
}

func (h *lazyHandler) Handle(ctx context.Context, r slog.Record) error {
	h.once.Do(func() {
		applied := h.base
		for _, s := range h.steps {
			if s.group != "" {
				applied = applied.WithGroup(s.group)
			} else {
				applied = applied.WithAttrs(s.attrs)
			}
		}
		*h.built = applied
	})
	return (*h.built).Handle(ctx, r)
}

func (h *lazyHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return h
	}
	return h.with(lazyStep{attrs: append([]slog.Attr(nil), attrs...)})
}

func (h *lazyHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	return h.with(lazyStep{group: name})
}

func (h *lazyHandler) with(step lazyStep) *lazyHandler {
	steps := make([]lazyStep, len(h.steps), len(h.steps)+1)
	copy(steps, h.steps)
	return &lazyHandler{base: h.base, steps: append(steps, step), once: new(sync.Once), built: new(slog.Handler)}
}
