// Command ferretdb-embedded runs FerretDB 1.24 with its SQLite handler as a local,
// file-backed MongoDB-compatible server for development and tests.
//
// It embeds github.com/FerretDB/FerretDB/ferretdb instead of building upstream's
// cmd/ferretdb, whose binary panics at start-up when built with `go install`: its version
// file is produced by upstream's own build tooling.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	_ "net/http/pprof" // served only when -debug-addr is set
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	addr := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on")
	dataDir := flag.String("data-dir", "data", "directory for the SQLite databases")
	logLevel := flag.String("log-level", "warn", "log level: debug, info, warn or error")
	synchronous := flag.String("sqlite-synchronous", "normal",
		"SQLite synchronous pragma: full (fsync every commit), or normal (WAL: a commit survives a process "+
			"crash and is synced at checkpoints; a power loss can lose the last commits)")
	tempStore := flag.String("sqlite-temp-store", "memory",
		"SQLite temp_store pragma: memory keeps statement journals (written for every multi-row "+
			"statement inside a transaction) in RAM; with file they were ~12% of FerretDB's CPU in "+
			"pwrite calls under load; default keeps SQLite's own choice")
	cacheKiB := flag.Int("sqlite-cache-kib", 0,
		"SQLite page cache per connection in KiB (cache_size pragma); 0 keeps SQLite's default (2 MiB)")
	mmapMiB := flag.Int("sqlite-mmap-mib", 0,
		"SQLite mmap_size in MiB: database pages are read through a memory map instead of pread; 0 keeps it off")
	autocheckpoint := flag.Int("sqlite-wal-autocheckpoint", 0,
		"SQLite wal_autocheckpoint in pages: a checkpoint copies the WAL into the database and fsyncs both; "+
			"0 keeps SQLite's default (1000 pages)")
	indexInterval := flag.Duration("id-index-interval", 500*time.Millisecond,
		"how often new collections get their _id lookup index (see idindex.go)")
	gcPercent := flag.Int("gc-percent", 400,
		"Go GC target percentage unless GOGC is set: FerretDB allocates heavily per command, and at Go's "+
			"default (100) garbage collection took 15-20% of its CPU under load; 400 trades some memory for it")
	debugAddr := flag.String("debug-addr", "",
		"if set, serve Go's pprof profiles on this address (e.g. 127.0.0.1:8089/debug/pprof/)")
	flag.Parse()

	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(*gcPercent)
	}

	abs, err := filepath.Abs(*dataDir)
	if err != nil {
		fail(err)
	}
	if err := os.MkdirAll(abs, 0o755); err != nil {
		fail(err)
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fail(err)
	}
	// lazyHandler: FerretDB derives a logger for every SQL statement it runs (lazylog.go).
	logger := slog.New(newLazyHandler(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level})))

	db, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *addr},
		Logger:    logger,
		Handler:   "sqlite",
		SQLiteURL: sqliteURL(abs, *synchronous, *tempStore, *cacheKiB, *mmapMiB, *autocheckpoint),
	})
	if err != nil {
		fail(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	go newIDIndexKeeper(abs, logger).run(ctx, *indexInterval)

	if *debugAddr != "" {
		go func() {
			logger.Warn("pprof listening", "addr", *debugAddr)
			if err := http.ListenAndServe(*debugAddr, nil); err != nil {
				logger.Error("pprof listener failed", "error", err)
			}
		}()
	}

	logger.Warn("ferretdb listening", "addr", *addr, "data_dir", abs)
	if err := db.Run(ctx); err != nil {
		fail(err)
	}
}

// sqliteURL is the handler's data directory URL with the pragmas every connection runs.
func sqliteURL(dir, synchronous, tempStore string, cacheKiB, mmapMiB, autocheckpoint int) string {
	url := "file:" + dir + "/?_pragma=synchronous(" + synchronous + ")&_pragma=temp_store(" + tempStore + ")"
	if cacheKiB > 0 {
		url += fmt.Sprintf("&_pragma=cache_size(-%d)", cacheKiB)
	}
	if mmapMiB > 0 {
		url += fmt.Sprintf("&_pragma=mmap_size(%d)", int64(mmapMiB)<<20)
	}
	if autocheckpoint > 0 {
		url += fmt.Sprintf("&_pragma=wal_autocheckpoint(%d)", autocheckpoint)
	}
	return url
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "ferretdb-embedded:", err)
	os.Exit(1)
}
