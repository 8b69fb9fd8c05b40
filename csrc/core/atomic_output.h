/* Output files appear whole or not at all: bytes go to a temporary file beside the target
 * (same folder, so rename is atomic), which is fsynced and renamed over the target only on
 * success; on failure or a signal it is removed and an existing target is untouched. C11. */
#ifndef TM_CORE_ATOMIC_OUTPUT_H
#define TM_CORE_ATOMIC_OUTPUT_H

#include "core/error.h"
#include "core/internal_export.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tm_atomic_output {
    int fd;              /* open for writing, or -1 */
    char *target;        /* malloc'd */
    char *temp;          /* malloc'd: "<dir>/.<base>.tmp.XXXXXX" */
} tm_atomic_output;

/* "<dir>/.<base>.<kind>.XXXXXX" for target, for mkostemp or mkdtemp: beside it, so the rename
 * into place stays in one filesystem; hidden, so a crash leaves no file that looks like a model.
 * Trailing slashes are ignored (a folder's temporary sits beside the folder). malloc'd; NULL when
 * out of memory. */
char *tm_temporary_name(const char *target, const char *kind);

/* Creates the temporary file for target. */
TM_INTERNAL tm_status tm_atomic_output_open(const char *target, tm_atomic_output *out, tm_error *err);
/* fsync + close + rename onto target + fsync of the folder. The temp is removed on failure. */
TM_INTERNAL tm_status tm_atomic_output_commit(tm_atomic_output *out, tm_error *err);
/* Closes and removes the temporary file (no-op when already committed or aborted). */
TM_INTERNAL void tm_atomic_output_abort(tm_atomic_output *out);

/* tm_remove_temporary_outputs() (public) removes every temporary file still open. */

/* Other temporary files (greedy soup candidates) that tm_remove_temporary_outputs() must
 * remove: path stays owned by the caller and must stay valid until it is untracked. */
void tm_temporary_track(char *path);
/* The same for a temporary folder holding only files (sharded output): every file in it is
 * removed, then the folder, so the files written into it need no entries of their own. */
void tm_temporary_track_folder(char *path);
/* Untracks a file or a folder. */
void tm_temporary_untrack(const char *path);

/* 1 when a and b name the same existing file or folder (an output must never replace an input). */
int tm_same_file(const char *a, const char *b);

#ifdef __cplusplus
}
#endif
#endif
