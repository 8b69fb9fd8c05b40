/* Safe unpickler, the final check: the memo lets a pickle share and even cycle values, so
 * before a tree is handed out it is walked once, iteratively, to guarantee callers can recurse
 * over tuples/lists/sets/dicts: no cycles and at most max_depth levels. */
#define _POSIX_C_SOURCE 200809L

#include "formats/pickle_internal.h"

#include <stdlib.h>
#include <string.h>

static int is_container(const tm_pk_value *v) {
    return v->kind == TM_PK_TUPLE || v->kind == TM_PK_LIST || v->kind == TM_PK_SET ||
           v->kind == TM_PK_DICT;
}

static size_t n_children(const tm_pk_value *v) {
    return v->kind == TM_PK_DICT ? 2 * v->u.dict.n : v->u.seq.n;
}

static tm_pk_value *child(const tm_pk_value *v, size_t i) {
    if (v->kind == TM_PK_DICT)
        return i < v->u.dict.n ? v->u.dict.keys[i] : v->u.dict.values[i - v->u.dict.n];
    return v->u.seq.items[i];
}

typedef struct dfs_frame {
    tm_pk_value *v;
    size_t next;
    uint32_t maxh;
} dfs_frame;

/* The walk's two work lists: the DFS path through containers, and the objects met so far
 * (each queued once; their args/state/items become further roots). */
typedef struct walk {
    dfs_frame *stk;
    size_t sp, cap;
    tm_pk_value **objs;
    size_t nobjs, objs_cap;
} walk;

/* Enters container v (marked as on the path); 0 when out of memory. */
static int push_frame(walk *w, tm_pk_value *v) {
    if (w->sp == w->cap) {
        dfs_frame *s = pk_grow(w->stk, &w->cap, sizeof *s, 64);
        if (!s) return 0;
        w->stk = s;
    }
    NODE(v)->color = 1;
    w->stk[w->sp++] = (dfs_frame){v, 0, 0};
    return 1;
}

/* Queues object o unless it was met before; 0 when out of memory. */
static int queue_object(walk *w, tm_pk_value *o) {
    if (NODE(o)->color != 0) return 1;
    NODE(o)->color = 2;
    if (w->nobjs == w->objs_cap) {
        tm_pk_value **a = pk_grow(w->objs, &w->objs_cap, sizeof *a, 16);
        if (!a) return 0;
        w->objs = a;
    }
    w->objs[w->nobjs++] = o;
    return 1;
}

/* Guarantees callers can walk tuples/lists/sets/dicts recursively: no cycles and at most
 * max_depth levels. OBJECT placeholders are cut points: their args/state/items are checked as
 * separate roots, so a cycle through an object (OmegaConf configs keep _parent links) is
 * accepted; walkers that descend into objects must bound themselves. Iterative, linear. */
tm_status pk_check_graph(parser *p, tm_pk_value *root) {
    tm_status st = TM_OK;
    walk w;
    memset(&w, 0, sizeof w);
    size_t next_obj = 0, next_obj_child = 0;
    tm_pk_value *start = root;
    for (;;) {
        if (start && start->kind == TM_PK_OBJECT) {
            if (!queue_object(&w, start)) { st = pk_nomem(p); goto done; }
        } else if (start && is_container(start) && NODE(start)->color == 0) {
            w.sp = 0;
            if (!push_frame(&w, start)) { st = pk_nomem(p); goto done; }
            while (w.sp) {
                dfs_frame *f = &w.stk[w.sp - 1];
                if (f->next < n_children(f->v)) {
                    tm_pk_value *c = child(f->v, f->next++);
                    if (c->kind == TM_PK_OBJECT) {
                        if (!queue_object(&w, c)) { st = pk_nomem(p); goto done; }
                        continue;
                    }
                    if (!is_container(c)) continue;
                    node *cn = NODE(c);
                    if (cn->color == 1) {
                        st = pk_err(p, TM_ERROR_UNSUPPORTED,
                                    "a %s contains itself (self-referencing data)",
                                    tm_pk_kind_name(c->kind));
                        goto done;
                    }
                    if (cn->color == 2) {
                        if (cn->height > f->maxh) f->maxh = cn->height;
                        continue;
                    }
                    if (w.sp >= p->lim.max_depth) {
                        st = pk_err(p, TM_ERROR_LIMIT, "nesting deeper than %zu (limit)",
                                    p->lim.max_depth);
                        goto done;
                    }
                    if (!push_frame(&w, c)) { st = pk_nomem(p); goto done; }
                } else {
                    uint32_t h = f->maxh + 1;
                    NODE(f->v)->height = h;
                    NODE(f->v)->color = 2;
                    w.sp--;
                    if ((size_t)h > p->lim.max_depth) {
                        st = pk_err(p, TM_ERROR_LIMIT, "nesting deeper than %zu (limit)",
                                    p->lim.max_depth);
                        goto done;
                    }
                    if (w.sp && h > w.stk[w.sp - 1].maxh) w.stk[w.sp - 1].maxh = h;
                }
            }
        }
        /* next root: the children of queued objects */
        start = NULL;
        while (!start && next_obj < w.nobjs) {
            tm_pk_value *o = w.objs[next_obj];
            tm_pk_value *cands[3] = {o->u.object.args, o->u.object.state, o->u.object.items};
            if (next_obj_child < 3) {
                start = cands[next_obj_child++];
            } else {
                next_obj++;
                next_obj_child = 0;
            }
        }
        if (!start && next_obj >= w.nobjs) break;
    }
done:
    free(w.stk);
    free(w.objs);
    return st;
}
