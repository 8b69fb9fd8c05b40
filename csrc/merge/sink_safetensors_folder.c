/* A sharded Hugging Face folder: model.safetensors (or model-0000i-of-0000n.safetensors plus
 * model.safetensors.index.json), the first input folder's side files (config, tokenizer, ...)
 * and the recipe, all written into a temporary folder beside OUT that is renamed into place
 * whole, so OUT is the old folder or the new one, never a mix. C11. */
#define _GNU_SOURCE
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/atomic_output.h"
#include "core/fs.h"
#include "merge/sink.h"

#define DEFAULT_MAX_SHARD ((uint64_t)5 << 30)

/* Side files are copied whatever their size (a tokenizer can be tens of MB). */
#define SIDE_FILE_LIMIT SIZE_MAX

static int is_weight_file(const char *name) {
    static const char *const ends[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json",
                                       ".msgpack", ".h5", ".onnx", ".gguf", ".pth.tar"};
    size_t n = strlen(name);
    for (size_t i = 0; i < sizeof ends / sizeof ends[0]; i++) {
        size_t e = strlen(ends[i]);
        if (n >= e && strcmp(name + n - e, ends[i]) == 0) return 1;
    }
    return 0;
}

/* config.json with torch_dtype set to the --dtype written (text replaced in *buf; unchanged when
 * it is not a JSON object). */
static void set_torch_dtype(const merge_ctx *c, char **buf, size_t *len) {
    cJSON *cfg = cJSON_ParseWithLength(*buf, *len);
    if (cfg && cJSON_IsObject(cfg)) {
        cJSON_DeleteItemFromObjectCaseSensitive(cfg, "torch_dtype");
        cJSON_AddStringToObject(cfg, "torch_dtype", tm_dtype_name(c->o->dtype));
        char *text = cJSON_Print(cfg);
        if (text) {
            free(*buf);
            *buf = text;
            *len = strlen(text);
        }
    }
    cJSON_Delete(cfg);
}

/* Copies the first input folder's non-weight files (config, tokenizer, generation config),
 * setting torch_dtype in config.json when --dtype changes it. */
static tm_status copy_side_files(const merge_ctx *c, const char *from, const char *to, tm_error *err) {
    DIR *d = opendir(from);
    if (!d) return TM_OK;
    tm_status st = TM_OK;
    struct dirent *e;
    while (!st && (e = readdir(d))) {
        if (e->d_name[0] == '.' || is_weight_file(e->d_name) || strcmp(e->d_name, "torchmerge_recipe.yaml") == 0)
            continue;
        char *src = NULL, *dst = NULL;
        if (asprintf(&src, "%s/%s", from, e->d_name) < 0 || asprintf(&dst, "%s/%s", to, e->d_name) < 0) {
            free(src);
            closedir(d);
            return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        }
        struct stat sb;
        if (stat(src, &sb) == 0 && S_ISREG(sb.st_mode)) {
            char *buf = NULL;
            size_t len = 0;
            st = tm_fs_read_file(src, SIDE_FILE_LIMIT, NULL, &buf, &len, err);
            if (!st && c->o->has_dtype && strcmp(e->d_name, "config.json") == 0) set_torch_dtype(c, &buf, &len);
            if (!st) st = tm_fs_write_file(dst, buf, len, err);
            free(buf);
        }
        free(src);
        free(dst);
    }
    closedir(d);
    return st;
}

/* first[s] = the first unit of shard s (first[n] = n_units): units in plan order, a new shard
 * when the next unit would pass max (a unit larger than max gets a shard of its own). */
static size_t plan_shards(const tm_plan *p, uint64_t max, size_t *first, uint64_t *total) {
    size_t n_shards = 0;
    uint64_t cur = 0;
    *total = 0;
    for (size_t u = 0; u < p->n_units; u++) {
        uint64_t bytes = (uint64_t)p->units[u].numel * tm_dtype_size(p->units[u].out_dtype);
        if (n_shards == 0 || (cur > 0 && cur + bytes > max)) { first[n_shards++] = u; cur = 0; }
        cur += bytes;
        *total += bytes;
    }
    first[n_shards] = p->n_units;
    return n_shards;
}

/* The shards, the index, the side files and the recipe, into the temporary folder tmp. */
static tm_status write_contents(merge_ctx *c, const char *target, const char *tmp, const tm_output_metadata *m,
                                tm_error *err) {
    uint64_t max = c->o->max_shard_size ? c->o->max_shard_size : DEFAULT_MAX_SHARD, total = 0;
    size_t *first = malloc((c->plan.n_units + 2) * sizeof *first), n_shards = 0, done = 0;
    if (!first) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    n_shards = plan_shards(&c->plan, max, first, &total);
    tm_status st = TM_OK;
    cJSON *index = cJSON_CreateObject(), *meta = cJSON_AddObjectToObject(index, "metadata");
    cJSON_AddNumberToObject(meta, "total_size", (double)total);
    cJSON *wmap = cJSON_AddObjectToObject(index, "weight_map");
    for (size_t s = 0; s < n_shards && !st; s++) {
        char name[64], *path = NULL;
        if (n_shards == 1) snprintf(name, sizeof name, "model.safetensors");
        else snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, n_shards);
        if (asprintf(&path, "%s/%s", tmp, name) < 0) { st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory"); break; }
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0) st = tm_error_set(err, TM_ERROR_IO, "%s: cannot create: %s", path, strerror(errno));
        if (!st) {
            char label[4200];
            snprintf(label, sizeof label, "%s/%s", target, name);
            st = tm_sink_safetensors_units(c, fd, label, first[s], first[s + 1], m, &done, err);
            if (!st && fsync(fd) != 0) st = tm_error_set(err, TM_ERROR_IO, "%s: cannot write: %s", label, strerror(errno));
            close(fd);
        }
        for (size_t u = first[s]; u < first[s + 1]; u++)
            cJSON_AddStringToObject(wmap, c->plan.keys[c->plan.units[u].keys[0]], name);
        free(path);
    }
    if (!st && n_shards > 1) {
        char *text = cJSON_Print(index), *path = NULL;
        if (!text || asprintf(&path, "%s/model.safetensors.index.json", tmp) < 0) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        else st = tm_fs_write_file(path, text, strlen(text), err);
        free(text);
        free(path);
    }
    cJSON_Delete(index);
    free(first);
    const char *src_folder = tm_checkpoint_folder(c->in[0]);
    if (!st && src_folder) st = copy_side_files(c, src_folder, tmp, err);
    if (!st && c->o->recipe_text) {
        char *path = NULL;
        if (asprintf(&path, "%s/torchmerge_recipe.yaml", tmp) < 0) st = tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
        else st = tm_fs_write_file(path, c->o->recipe_text, strlen(c->o->recipe_text), err);
        free(path);
    }
    return st;
}

/* Puts the finished folder tmp at target. An existing folder is moved aside, the new one renamed
 * into place, the old one removed. No signal is taken between the two renames: its handler would
 * find neither folder at OUT. Once the new one is there, the old one is a temporary like any
 * other. */
static tm_status rename_into_place(char *tmp, const char *target, tm_error *err) {
    tm_status st = TM_OK;
    char *old = NULL;
    struct stat sb;
    int exists = stat(target, &sb) == 0;
    if (exists && asprintf(&old, "%s.old", tmp) < 0) old = NULL;
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &before);
    if (exists && (!old || rename(target, old) != 0))
        st = tm_error_set(err, TM_ERROR_IO, "%s: cannot replace the existing folder: %s", target, strerror(errno));
    if (!st && rename(tmp, target) != 0) {
        st = tm_error_set(err, TM_ERROR_IO, "%s: cannot rename the temporary folder into place: %s", target, strerror(errno));
        if (old) rename(old, target);
    }
    if (!st) {
        tm_temporary_untrack(tmp);
        if (old) tm_temporary_track_folder(old);
    }
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    if (!st && old) {
        tm_fs_remove_flat_folder(old);
        tm_temporary_untrack(old);
    }
    free(old);
    return st;
}

tm_status tm_sink_safetensors_folder_write(merge_ctx *c, const char *output, const tm_output_metadata *m,
                                           tm_error *err) {
    char *target = strdup(output);
    if (!target) return tm_error_set(err, TM_ERROR_NOMEM, "out of memory");
    while (strlen(target) > 1 && target[strlen(target) - 1] == '/') target[strlen(target) - 1] = '\0';
    char *tmp = tm_temporary_name(target, "tmp");
    /* Registered before it exists (mkdtemp fills the name in place), so a signal arriving right
     * after it is created still finds it; the handler removes the shards in it too. */
    if (tmp) tm_temporary_track_folder(tmp);
    if (!tmp || !mkdtemp(tmp)) {
        tm_status st = tm_error_set(err, TM_ERROR_IO, "%s: cannot create a temporary folder beside it: %s", target,
                                    strerror(errno));
        if (tmp) tm_temporary_untrack(tmp);
        free(tmp);
        free(target);
        return st;
    }
    tm_status st = write_contents(c, target, tmp, m, err);
    if (!st) st = rename_into_place(tmp, target, err);
    if (st) {
        tm_fs_remove_flat_folder(tmp);
        tm_temporary_untrack(tmp);
    }
    free(tmp);
    free(target);
    return st;
}
