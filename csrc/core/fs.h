/* Small filesystem helpers shared by the writers and readers: whole small files written or read
 * in one call, flat folders removed, folder outputs recognised. Large outputs go through
 * core/atomic_output (write to a temporary, then rename) instead. C11. */
#ifndef TM_CORE_FS_H
#define TM_CORE_FS_H

#include <stddef.h>

#include "core/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Creates path (it must not exist), writes the len bytes and fsyncs it, so a folder renamed into
 * place afterwards never holds a half-written file. */
tm_status tm_fs_write_file(const char *path, const void *data, size_t len, tm_error *err);

/* Reads the whole of path into *out (malloc'd, NUL-terminated, *len bytes before the NUL).
 * More than limit bytes is TM_ERROR_LIMIT; a missing file is TM_ERROR_NOT_FOUND. what names
 * the file in the messages ("cannot open the recipe: ..."); NULL for none ("cannot open: ..."). */
tm_status tm_fs_read_file(const char *path, size_t limit, const char *what, char **out, size_t *len, tm_error *err);

/* Removes every entry of a folder that holds only files, then the folder; errors are ignored
 * (clean-up of our own temporaries). */
void tm_fs_remove_flat_folder(const char *dir);

/* 1 when output names a folder: an existing one, or a path ending in '/'. */
int tm_fs_is_folder_output(const char *output);

#ifdef __cplusplus
}
#endif
#endif
