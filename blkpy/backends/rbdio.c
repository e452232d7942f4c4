/* See rbdio.h. A queue is driven by one thread (a ring's loop or its engine): submit,
 * reap and the backlog are that thread's; librbd's threads only post completions. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#if defined(__has_include)
#if __has_include(<rbd/librbd.h>)
#define BLKPY_HAVE_LIBRBD 1
#endif
#endif

#ifndef BLKPY_HAVE_LIBRBD

struct blkpy_rbd *blkpy_rbd_new(void *image, int readonly, uint64_t size, char *msg,
                                uint32_t msglen)
{
    (void)image, (void)readonly, (void)size;
    snprintf(msg, msglen, "blkpy was built without librbd's headers (install librbd-dev "
             "and reinstall blkpy)");
    return NULL;
}
void blkpy_rbd_set_size(struct blkpy_rbd *r, uint64_t size) { (void)r, (void)size; }
void blkpy_rbd_free(struct blkpy_rbd *r) { (void)r; }
struct blkpy_disk_queue *blkpy_rbd_queue_new(struct blkpy_rbd *r) { (void)r; return NULL; }

#else /* BLKPY_HAVE_LIBRBD */

#include <dlfcn.h>
#include <pthread.h>
#include <rbd/librbd.h>

/* Every librbd function used, looked up once with dlsym (typed by the header). */
#define RBDIO_FUNCS(X)                                                                    \
    X(rbd_aio_create_completion) X(rbd_aio_get_return_value) X(rbd_aio_release)          \
    X(rbd_aio_readv) X(rbd_aio_writev) X(rbd_aio_flush) X(rbd_aio_write_zeroes)

static struct {
#define RBDIO_MEMBER(f) __typeof__(f) *f;
    RBDIO_FUNCS(RBDIO_MEMBER)
} rbdio_lib;
static pthread_once_t rbdio_once = PTHREAD_ONCE_INIT;
static char rbdio_load_error[256];
#define R(f) (rbdio_lib.f)

static void rbdio_load(void)
{
    void *so = dlopen("librbd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!so) {
        snprintf(rbdio_load_error, sizeof rbdio_load_error, "cannot load librbd: %s",
                 dlerror());
        return;
    }
#define RBDIO_LOOKUP(f)                                                                   \
    if (!(rbdio_lib.f = (__typeof__(f) *)dlsym(so, #f))) {                                \
        snprintf(rbdio_load_error, sizeof rbdio_load_error, "librbd lacks " #f);          \
        return;                                                                           \
    }
    RBDIO_FUNCS(RBDIO_LOOKUP)
}

struct blkpy_rbd {
    rbd_image_t image;
    int readonly;
    uint64_t size;   /* atomic: the control thread resizes, ring threads check */
};

struct blkpy_rbd_queue {
    struct blkpy_disk_queue dq;   /* first: the queue is freed through it */
    struct blkpy_rbd *r;
    struct rbdio_op *head, *tail;  /* submitted, not yet started, in order */
    uint32_t backlog;              /* ops in that list */
    int fence_last;                /* the op started last is a flush or a discard */
};

struct rbdio_op {
    struct blkpy_queue_done done;  /* first: the completion list frees the op */
    struct blkpy_rbd_queue *q;
    uint32_t kind, iovcnt;
    uint64_t offset, length;
    const struct iovec *iov;
    struct rbdio_op *next;
};

static int rbdio_is_fence(const struct rbdio_op *op)
{
    return op->kind == BLKPY_QOP_FLUSH || op->kind == BLKPY_QOP_ZERO;
}

static void rbdio_end(struct rbdio_op *op, int64_t result)
{
    op->done.result = result;
    blkpy_queue_post(&op->q->dq, &op->done);
}

/* Past the end of an image shrunk under us a read comes back short: the rest reads as
 * zeros (what the synchronous path gives too). */
static void rbdio_zero_tail(const struct rbdio_op *op, uint64_t got)
{
    for (uint32_t k = 0; k < op->iovcnt; k++) {
        uint64_t len = op->iov[k].iov_len;
        if (got >= len) {
            got -= len;
            continue;
        }
        memset((char *)op->iov[k].iov_base + got, 0, len - got);
        got = 0;
    }
}

/* librbd's completion callback (a librbd thread). */
static void rbdio_complete(rbd_completion_t c, void *arg)
{
    struct rbdio_op *op = arg;
    ssize_t r = R(rbd_aio_get_return_value)(c);
    R(rbd_aio_release)(c);
    if (r >= 0 && op->kind == BLKPY_QOP_READ && (uint64_t)r < op->length)
        rbdio_zero_tail(op, (uint64_t)r);
    rbdio_end(op, r < 0 ? r : 0);
}

/* 0 if the op may go to librbd, else its result. Everything here comes from the guest
 * (through the loop's or the dispatcher's checks): check again what librbd would get. */
static int64_t rbdio_refuse(const struct blkpy_rbd *r, const struct rbdio_op *op)
{
    if (op->kind > BLKPY_QOP_ZERO)
        return -EINVAL;   /* trim is NBD's */
    if (op->kind != BLKPY_QOP_READ && r->readonly)
        return op->kind == BLKPY_QOP_FLUSH ? 1 : -EROFS;   /* nothing written: done */
    if (op->kind == BLKPY_QOP_FLUSH)
        return 0;
    uint64_t size = __atomic_load_n(&r->size, __ATOMIC_RELAXED);
    if (op->offset > size || op->length > size - op->offset)
        return -EINVAL;
    if (op->kind == BLKPY_QOP_ZERO)
        return op->length ? 0 : 1;
    if (op->iovcnt > IOV_MAX)
        return -EINVAL;
    uint64_t total = 0;
    for (uint32_t k = 0; k < op->iovcnt; k++)
        total += op->iov[k].iov_len;
    if (total != op->length)
        return -EINVAL;
    return op->length ? 0 : 1;
}

static void rbdio_start(struct blkpy_rbd_queue *q, struct rbdio_op *op)
{
    struct blkpy_rbd *r = q->r;
    int64_t refused = rbdio_refuse(r, op);
    if (refused) {
        rbdio_end(op, refused > 0 ? 0 : refused);
        return;
    }
    rbd_completion_t c;
    int ret = R(rbd_aio_create_completion)(op, rbdio_complete, &c);
    if (ret < 0) {
        rbdio_end(op, ret);
        return;
    }
    switch (op->kind) {
    case BLKPY_QOP_READ:
        ret = R(rbd_aio_readv)(r->image, op->iov, (int)op->iovcnt, op->offset, c);
        break;
    case BLKPY_QOP_WRITE:
        ret = R(rbd_aio_writev)(r->image, op->iov, (int)op->iovcnt, op->offset, c);
        break;
    case BLKPY_QOP_FLUSH:
        ret = R(rbd_aio_flush)(r->image, c);
        break;
    default:   /* librbd's plain discard skips what its granularity does not cover */
        ret = R(rbd_aio_write_zeroes)(r->image, op->offset, op->length, c, 0, 0);
        break;
    }
    if (ret < 0) {   /* refused before it was queued: librbd never calls back */
        R(rbd_aio_release)(c);
        rbdio_end(op, ret);
    }
}

/* Start what the ordering allows: a flush or discard once everything started before it
 * has completed, anything else once no flush or discard is running. */
static void rbdio_pump(struct blkpy_disk_queue *dq)
{
    struct blkpy_rbd_queue *q = (struct blkpy_rbd_queue *)dq;
    while (q->head) {
        struct rbdio_op *op = q->head;
        uint32_t running = blkpy_queue_outstanding(dq) - q->backlog;
        if (running && (q->fence_last || rbdio_is_fence(op)))
            return;   /* a completion's reap pumps again */
        q->head = op->next;
        if (!q->head)
            q->tail = NULL;
        q->backlog--;
        q->fence_last = rbdio_is_fence(op);
        rbdio_start(q, op);
    }
}

static int rbdio_submit(struct blkpy_disk_queue *dq, const struct blkpy_queue_op *ops,
                        uint32_t n)
{
    struct blkpy_rbd_queue *q = (struct blkpy_rbd_queue *)dq;
    struct rbdio_op *first = NULL, **link = &first, *last = NULL;
    for (uint32_t k = 0; k < n; k++) {
        struct rbdio_op *op = malloc(sizeof *op);
        if (!op) {
            while (first) {
                struct rbdio_op *next = first->next;
                free(first);
                first = next;
            }
            return -ENOMEM;
        }
        *op = (struct rbdio_op){
            .done.user_data = ops[k].user_data, .q = q, .kind = ops[k].kind,
            .iovcnt = ops[k].iov_count, .offset = ops[k].offset, .length = ops[k].length,
            .iov = (const struct iovec *)(uintptr_t)ops[k].iov_addr,
        };
        *link = last = op;
        link = &op->next;
    }
    if (!first)
        return 0;
    if (q->tail)
        q->tail->next = first;
    else
        q->head = first;
    q->tail = last;
    q->backlog += n;
    rbdio_pump(dq);
    return 0;
}

struct blkpy_rbd *blkpy_rbd_new(void *image, int readonly, uint64_t size, char *msg,
                                uint32_t msglen)
{
    pthread_once(&rbdio_once, rbdio_load);
    if (rbdio_load_error[0]) {
        snprintf(msg, msglen, "%s", rbdio_load_error);
        return NULL;
    }
    struct blkpy_rbd *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(msg, msglen, "out of memory");
        return NULL;
    }
    r->image = image;
    r->readonly = readonly;
    r->size = size;
    return r;
}

void blkpy_rbd_set_size(struct blkpy_rbd *r, uint64_t size)
{
    __atomic_store_n(&r->size, size, __ATOMIC_RELAXED);
}

void blkpy_rbd_free(struct blkpy_rbd *r)
{
    free(r);
}

struct blkpy_disk_queue *blkpy_rbd_queue_new(struct blkpy_rbd *r)
{
    /* (freed by blkpy_queue_free with nothing outstanding: the backlog is empty) */
    struct blkpy_rbd_queue *q = (struct blkpy_rbd_queue *)blkpy_queue_new(
        sizeof(struct blkpy_rbd_queue), rbdio_submit, rbdio_pump);
    if (q)
        q->r = r;
    return q ? &q->dq : NULL;
}

#endif /* BLKPY_HAVE_LIBRBD */
