package main

// FerretDB 1.24's SQLite handler creates each collection's unique _id index on the
// expression  _ferretdb_sjson->"_id"  but filters with  _ferretdb_sjson->'$._id' . SQLite
// matches index expressions textually, so no lookup by _id ever uses that index: every
// find, update, replace or delete by _id scans the whole collection (measured: a find_one of
// the last of 3,000 documents takes 12 ms, of the first 1 ms; a replace 14 ms).
//
// The keeper below rebuilds that unique index, under the same name, on the expression the
// handler filters with (one transaction: the collection is never without it). Both
// expressions name the same value (SQLite reads a bare label X after -> as '$.X'), so the
// index refuses the same duplicates and FerretDB reports them the same way (it looks only at
// the constraint error's code); its metadata lists the index by that name as before. The
// data is untouched, and dropping a collection drops its table with the index.
//
// Before, the keeper added a second, plain index on the filter expression and left the
// unique one as it was: every insert and replace then maintained two _id indexes, one never
// read (measured: a replace cost FerretDB ~13% more CPU). Tables indexed that way are
// rebuilt too and lose the extra index.

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	_ "modernc.org/sqlite" // the same SQLite driver FerretDB itself uses
)

const idExpression = `_ferretdb_sjson->'$._id'`

// ferretIDExpression is how FerretDB writes the _id index's expression (sqlite_master.sql).
const ferretIDExpression = `_ferretdb_sjson->"_id"`

type idIndexKeeper struct {
	dir    string
	logger *slog.Logger
	seen   map[string]indexedSchema // database file → what was last indexed
}

// indexedSchema names a database file's schema the keeper indexed: which file (a database
// dropped and created again is a new file under the same name) at which schema_version.
type indexedSchema struct {
	file    os.FileInfo
	version int64
}

func newIDIndexKeeper(dir string, logger *slog.Logger) *idIndexKeeper {
	return &idIndexKeeper{dir: dir, logger: logger, seen: map[string]indexedSchema{}}
}

// run checks every database file each interval until ctx ends.
func (k *idIndexKeeper) run(ctx context.Context, interval time.Duration) {
	ticker := time.NewTicker(interval)
	defer ticker.Stop()

	for {
		k.pass(ctx)
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
	}
}

func (k *idIndexKeeper) pass(ctx context.Context) {
	files, err := filepath.Glob(filepath.Join(k.dir, "*.sqlite"))
	if err != nil {
		k.logger.Warn("id index keeper: listing databases failed", "error", err)
		return
	}

	present := make(map[string]bool, len(files))
	for _, file := range files {
		present[file] = true
		if err := k.check(ctx, file); err != nil {
			// A database being dropped or created right now: look again next time.
			k.logger.Debug("id index keeper: check failed", "file", filepath.Base(file), "error", err)
			delete(k.seen, file)
		}
	}

	for file := range k.seen {
		if !present[file] {
			delete(k.seen, file)
		}
	}
}

// check indexes the collection tables of one database file whose _id index is not usable. It
// holds a connection only while it checks: a connection kept across passes outlives a drop
// of the database, and when SQLite closes the last connection of a database it removes the
// write-ahead log by its name, which by then may belong to a new database of the same name
// ("file is not a database" for FerretDB afterwards: seen with a database dropped and
// created again at once).
func (k *idIndexKeeper) check(ctx context.Context, file string) error {
	info, err := os.Stat(file)
	if err != nil {
		return err
	}
	// mode=rw: never create a database file FerretDB has just removed.
	db, err := sql.Open("sqlite", "file:"+file+"?mode=rw&_pragma=busy_timeout(10000)")
	if err != nil {
		return err
	}
	db.SetMaxOpenConns(1)
	defer func() {
		_ = db.Close()
		// Dropped while we looked: our close may have left -wal and -shm files behind, which a
		// later database of the same name must not find.
		if _, err := os.Stat(file); errors.Is(err, fs.ErrNotExist) {
			_ = os.Remove(file + "-wal")
			_ = os.Remove(file + "-shm")
		}
	}()

	var version int64
	if err := db.QueryRowContext(ctx, "PRAGMA schema_version").Scan(&version); err != nil {
		return err
	}
	if seen, ok := k.seen[file]; ok && seen.version == version && os.SameFile(seen.file, info) {
		return nil // no table created since the last pass
	}

	tables, err := collectionTables(ctx, db)
	if err != nil {
		return err
	}
	for _, table := range tables {
		if err := indexTable(ctx, db, table); err != nil {
			return fmt.Errorf("indexing %s: %w", table, err)
		}
	}

	// Creating indexes bumps the schema version: remember the version after them.
	if err := db.QueryRowContext(ctx, "PRAGMA schema_version").Scan(&version); err != nil {
		return err
	}
	k.seen[file] = indexedSchema{file: info, version: version}

	return nil
}

func collectionTables(ctx context.Context, db *sql.DB) ([]string, error) {
	var exists int
	err := db.QueryRowContext(ctx,
		`SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_ferretdb_collections'`).Scan(&exists)
	if err != nil || exists == 0 {
		return nil, err
	}

	rows, err := db.QueryContext(ctx, `SELECT table_name FROM _ferretdb_collections`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()

	var tables []string
	for rows.Next() {
		var table string
		if err := rows.Scan(&table); err != nil {
			return nil, err
		}
		if !strings.HasPrefix(table, "_ferretdb_") {
			tables = append(tables, table)
		}
	}

	return tables, rows.Err()
}

// indexTable makes a collection table's unique _id index usable for lookups by _id (see the
// top of this file), unless it is already.
func indexTable(ctx context.Context, db *sql.DB, table string) error {
	unique := table + "__id_"
	lookup := table + "_hometeam_id_lookup" // the second index earlier versions added

	var definition sql.NullString
	err := db.QueryRowContext(ctx, `SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?`, unique).Scan(&definition)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		// No unique _id index (not made by FerretDB 1.24 as we know it): add a plain one.
		_, err = db.ExecContext(ctx, fmt.Sprintf(`CREATE INDEX IF NOT EXISTS %q ON %q (%s)`, lookup, table, idExpression))
		return err
	case err != nil:
		return err
	case !strings.Contains(definition.String, ferretIDExpression):
		return nil // rebuilt before
	}

	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }() // after Commit: a no-op

	for _, q := range []string{
		fmt.Sprintf(`DROP INDEX %q`, unique),
		fmt.Sprintf(`CREATE UNIQUE INDEX %q ON %q (%s)`, unique, table, idExpression),
		fmt.Sprintf(`DROP INDEX IF EXISTS %q`, lookup),
	} {
		if _, err := tx.ExecContext(ctx, q); err != nil {
			return err
		}
	}

	return tx.Commit()
}
