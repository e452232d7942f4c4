/* A network disk's asynchronous queue, the one interface the ring loop and Python's engine
 * drive whatever the client library behind it (NBD: nbdio.c, Ceph RBD: rbdio.c).
 *
 * Ops go in with submit; each comes back exactly once, in any order, as (user_data,
 * 0 or -errno) from reap; the queue's eventfd is readable while completions wait. A whole
 * transfer or nothing: a queue reports a short transfer as an error, or completes it
 * itself (zeros past the end of a shrunken image). Flushes and discards start only after
 * every earlier op of the queue has completed, and nothing after them starts before they
 * complete (the engines' ordering contract, like IOSQE_IO_DRAIN).
 *
 * The completion list is common: the client library's threads post to it, the queue's
 * one owner (a ring thread) reaps it. */
#ifndef BLKPY_DISKQ_H
#define BLKPY_DISKQ_H
#include <stdint.h>

/* CDEF-BEGIN */
struct blkpy_disk_queue;

/* One disk operation handed over from an IoVector entry or a ring request. */
#define BLKPY_QOP_READ 0
#define BLKPY_QOP_WRITE 1
#define BLKPY_QOP_FLUSH 2
#define BLKPY_QOP_ZERO 3      /* reads as zeros afterwards; the space may be released */
#define BLKPY_QOP_TRIM 4      /* the range may be dropped (NBD only) */
struct blkpy_queue_op {
    uint32_t kind;
    uint32_t iov_count;
    uint64_t offset;
    uint64_t length;
    uint64_t iov_addr;    /* struct iovec array, alive until the op completes */
    uint64_t user_data;
};

/* Queue n ops; 0 or -errno (then nothing was queued). */
int blkpy_queue_submit(struct blkpy_disk_queue *q, const struct blkpy_queue_op *ops,
                       uint32_t n);
/* Up to max completions: user_data and 0 or -errno each. */
int blkpy_queue_reap(struct blkpy_disk_queue *q, uint64_t *user_data, int64_t *result,
                     uint32_t max);
/* Completions wait (no system call: the ring loop asks on every spin). */
int blkpy_queue_ready(struct blkpy_disk_queue *q);
int blkpy_queue_fd(const struct blkpy_disk_queue *q);
/* Waits for whatever is still in flight (the library would write into freed memory),
 * then frees the queue. */
void blkpy_queue_free(struct blkpy_disk_queue *q);
/* CDEF-END */

#include <pthread.h>

/* A completed op; the first member of an implementation's op, freed by reap. */
struct blkpy_queue_done {
    struct blkpy_queue_done *next;
    uint64_t user_data;
    int64_t result;
};

struct blkpy_disk_queue {
    /* the implementation: queue ops (0 or -errno, nothing queued), start what waited
     * after completions were reaped (NULL: nothing waits) */
    int (*submit)(struct blkpy_disk_queue *q, const struct blkpy_queue_op *ops, uint32_t n);
    void (*pump)(struct blkpy_disk_queue *q);
    /* optional: a queue whose completions the owner's thread can read off the wire
     * itself. While it watches (watch 1 ... watch 0, counted), it calls drive whenever
     * drive_fd is readable, and whenever it waits for completions (the library's own
     * thread then leaves that to it: no hop to that thread and back per request). */
    int drive_fd;   /* -1: none */
    void (*drive)(struct blkpy_disk_queue *q);
    void (*watch)(struct blkpy_disk_queue *q, int on);
    int efd;
    int signalled;          /* efd written and not read since (under mu) */
    uint32_t outstanding;   /* submitted, not yet posted (atomic; changed under mu) */
    uint32_t waiting;       /* posted, not yet reaped (atomic; changed under mu) */
    pthread_mutex_t mu;
    struct blkpy_queue_done *head, *tail;
};

/* A zeroed implementation queue of `size` bytes whose first member is the common part,
 * set up with the implementation's hooks; NULL if out of memory or eventfds. Freed whole
 * by blkpy_queue_free (an implementation keeps nothing of its own to release there:
 * with nothing outstanding, its op lists are empty). */
struct blkpy_disk_queue *blkpy_queue_new(size_t size,
                                         int (*submit)(struct blkpy_disk_queue *,
                                                       const struct blkpy_queue_op *,
                                                       uint32_t),
                                         void (*pump)(struct blkpy_disk_queue *));
/* The optional hooks above; harmless on any queue. */
static inline int blkpy_queue_drive_fd(const struct blkpy_disk_queue *q)
{
    return q->drive ? q->drive_fd : -1;
}
/* The caller reaps this queue next: what the drive completes on it is posted without a
 * signal (an eventfd write and read per drive for nothing). */
void blkpy_queue_drive(struct blkpy_disk_queue *q);
static inline void blkpy_queue_watch(struct blkpy_disk_queue *q, int on)
{
    if (q->watch)
        q->watch(q, on);
}
/* Complete an op (any thread). The queue is not touched after the post returns, so
 * blkpy_queue_free may run as soon as nothing is outstanding. */
void blkpy_queue_post(struct blkpy_disk_queue *q, struct blkpy_queue_done *d);
/* Ops submitted whose completion is not yet posted. */
static inline uint32_t blkpy_queue_outstanding(struct blkpy_disk_queue *q)
{
    return __atomic_load_n(&q->outstanding, __ATOMIC_ACQUIRE);
}
#endif
