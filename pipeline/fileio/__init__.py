"""Files written whole and read within bounds; one module per concern:

- atomic.py: atomic writes (temp file + fsync + rename) and the sweep of dead writers' temps,
- readers.py: bounded readers (size limits before reading, one-line errors naming the path),
- lock.py: the exclusive lock that keeps two runs out of one run dir.

Callers use `from pipeline import fileio` / `fileio.write_json(...)`: this list is the API.
"""

from pipeline.fileio.atomic import (TEMP_SUFFIX, atomic_open, make_dirs, remove_dead_writers_temp_files,
                                    remove_stale_temp_files, write_bytes, write_csv, write_json, write_npy,
                                    write_text, write_with)
from pipeline.fileio.lock import file_lock
from pipeline.fileio.readers import (MAX_SMALL_FILE_BYTES, MAX_TABLE_BYTES, iter_npy_rows, read_at_most,
                                     read_bounded_text, read_csv_strings, read_json, read_npy, read_npy_shape,
                                     read_text)

__all__ = ["TEMP_SUFFIX", "atomic_open", "make_dirs", "remove_dead_writers_temp_files", "remove_stale_temp_files",
           "write_bytes", "write_csv", "write_json", "write_npy", "write_text", "write_with", "file_lock",
           "MAX_SMALL_FILE_BYTES", "MAX_TABLE_BYTES", "read_at_most", "read_bounded_text", "read_csv_strings",
           "read_json", "read_npy", "read_npy_shape", "iter_npy_rows", "read_text"]
