"""tasks.storedisk: which of the disk's refusals an SQLite error of the embedded store is, and what to do (pure)."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from tasks.storedisk import GENERIC, Facts, advice, facts, is_disk_refusal

SQLITE_FULL, SQLITE_IOERR_WRITE, SQLITE_IOERR_SHMSIZE = 13, 778, 4874
SQLITE_READONLY, SQLITE_READONLY_DIRECTORY, SQLITE_CANTOPEN, SQLITE_BUSY = 8, 1544, 14, 5
ROOMY = 50 << 30


def test_sqlite_full_is_a_full_disk_to_free_naming_data_dir_and_the_space_left():
    said = advice(Facts("/srv/push", code=SQLITE_FULL, free_bytes=4096))
    assert said == "the disk of DATA_DIR (/srv/push) is full, 4096 bytes free now: free space on it, or move DATA_DIR to a larger disk"


@pytest.mark.parametrize("code", [SQLITE_IOERR_WRITE, SQLITE_IOERR_SHMSIZE])
def test_a_disk_io_error_with_no_space_left_is_a_full_disk_too(code):
    # SQLite says "disk I/O error" when a write or the -shm file's growth got ENOSPC before writing anything
    assert "is full, 0 bytes free now: free space" in advice(Facts("/srv/push", code=code, free_bytes=0))


def test_a_disk_io_error_with_space_left_says_to_check_the_disk():
    assert advice(Facts("/srv/push", code=SQLITE_IOERR_WRITE, free_bytes=ROOMY)).startswith("the disk failed to read or write")


def test_a_file_at_the_workers_file_size_limit_says_to_remove_the_limit_not_to_free_space():
    said = advice(Facts("/srv/push", code=SQLITE_IOERR_WRITE, free_bytes=ROOMY, file_size_limit=1 << 20, largest_file=1 << 20))
    assert said.startswith("a file of it reached the worker's file size limit (1048576 bytes: ulimit -f")
    # a limit no file is near is not the cause
    assert "is full" in advice(Facts("/srv/push", code=SQLITE_FULL, free_bytes=0, file_size_limit=1 << 30, largest_file=1 << 20))


@pytest.mark.parametrize("code", [SQLITE_READONLY, SQLITE_READONLY_DIRECTORY, SQLITE_CANTOPEN])
def test_a_folder_the_worker_may_not_write_names_the_user_and_the_folder(code):
    said = advice(Facts("/srv/push", code=code, free_bytes=ROOMY, writable=False, user="push, uid 998"))
    assert said == ("the worker's user (push, uid 998) may not write its folder or files: give that user write access to "
                    "/srv/push and everything in it, or set DATA_DIR to a folder it owns")


def test_a_read_only_mount_says_to_remount_whatever_the_code():
    for code in (SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_IOERR_WRITE):
        assert advice(Facts("/srv/push", code=code, free_bytes=0, read_only_mount=True, writable=False)).endswith("remount it read-write")


def test_a_lock_held_elsewhere_is_not_taken_for_the_disk():
    assert "stuck process" in advice(Facts("/srv/push", code=SQLITE_BUSY, free_bytes=0))
    assert advice(Facts("/srv/push", code=None)) == GENERIC


def test_an_os_error_of_the_store_files_reads_as_its_sqlite_equivalent(tmp_path):
    assert facts(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path)).code == SQLITE_FULL
    assert facts(OSError(errno.EROFS, "Read-only file system"), str(tmp_path)).code == SQLITE_READONLY


def test_only_the_disks_refusals_are_disk_refusals():
    def error(code: int) -> sqlite3.OperationalError:
        exc = sqlite3.OperationalError("x")
        exc.sqlite_errorcode = code
        return exc

    assert all(is_disk_refusal(error(code)) for code in (SQLITE_FULL, SQLITE_IOERR_WRITE, SQLITE_READONLY_DIRECTORY, SQLITE_CANTOPEN))
    assert not is_disk_refusal(error(SQLITE_BUSY)) and not is_disk_refusal(sqlite3.IntegrityError("UNIQUE constraint failed"))
