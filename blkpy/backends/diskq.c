/* See diskq.h: the completion list every network disk's queue shares. */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

static void diskq_signal(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

/* The queue this thread is driving (blkpy_queue_drive): posts to it need no signal. */
static __thread struct blkpy_disk_queue *diskq_draining;

void blkpy_queue_drive(struct blkpy_disk_queue *q)
{
    if (!q->drive)
        return;
    diskq_draining = q;
    q->drive(q);
    diskq_draining = NULL;
}

struct blkpy_disk_queue *blkpy_queue_new(size_t size,
                                         int (*submit)(struct blkpy_disk_queue *,
                                                       const struct blkpy_queue_op *,
                                                       uint32_t),
                                         void (*pump)(struct blkpy_disk_queue *))
{
    struct blkpy_disk_queue *q = calloc(1, size);
    if (!q)
        return NULL;
    q->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->efd < 0) {
        free(q);
        return NULL;
    }
    q->submit = submit;
    q->pump = pump;
    q->drive_fd = -1;
    pthread_mutex_init(&q->mu, NULL);
    return q;
}

void blkpy_queue_post(struct blkpy_disk_queue *q, struct blkpy_queue_done *d)
{
    d->next = NULL;
    pthread_mutex_lock(&q->mu);
    if (q->tail)
        q->tail->next = d;
    else
        q->head = d;
    q->tail = d;
    __atomic_store_n(&q->waiting, q->waiting + 1, __ATOMIC_RELEASE);
    __atomic_store_n(&q->outstanding, q->outstanding - 1, __ATOMIC_RELEASE);
    /* Only the first completion waiting signals: the reaper takes them all (a system call
     * per completion cost the library's thread at depth); none when the reaper itself is
     * driving the queue (it reaps next). Under the lock: once a poster unlocks it is done
     * with the queue, so the owner, which frees the queue only when nothing is
     * outstanding, never frees it under a poster still signalling. */
    if (!q->signalled && q != diskq_draining) {
        diskq_signal(q->efd);
        q->signalled = 1;
    }
    pthread_mutex_unlock(&q->mu);
}

int blkpy_queue_submit(struct blkpy_disk_queue *q, const struct blkpy_queue_op *ops,
                       uint32_t n)
{
    /* Counted first: the implementation may complete an op before it returns. */
    pthread_mutex_lock(&q->mu);
    __atomic_store_n(&q->outstanding, q->outstanding + n, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&q->mu);
    int err = q->submit(q, ops, n);
    if (err) {
        pthread_mutex_lock(&q->mu);
        __atomic_store_n(&q->outstanding, q->outstanding - n, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&q->mu);
    }
    return err;
}

int blkpy_queue_ready(struct blkpy_disk_queue *q)
{
    return __atomic_load_n(&q->waiting, __ATOMIC_ACQUIRE) != 0;
}

int blkpy_queue_fd(const struct blkpy_disk_queue *q)
{
    return q->efd;
}

int blkpy_queue_reap(struct blkpy_disk_queue *q, uint64_t *user_data, int64_t *result,
                     uint32_t max)
{
    uint32_t n = 0;
    /* Nothing posted: no system call (the ring loop reaps on every pass). */
    if (__atomic_load_n(&q->waiting, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&q->mu);
        struct blkpy_queue_done *d = q->head;
        while (d && n < max) {
            struct blkpy_queue_done *next = d->next;
            user_data[n] = d->user_data;
            result[n] = d->result;
            free(d);
            d = next;
            n++;
        }
        q->head = d;
        if (!d)
            q->tail = NULL;
        __atomic_store_n(&q->waiting, q->waiting - n, __ATOMIC_RELEASE);
        /* Posts signal under the lock too: the fd is readable exactly while completions
         * wait (but those a drive posted for the reaper), so a waiter never spins on a
         * stale signal. */
        uint64_t v;
        if (q->signalled && !d) {
            while (read(q->efd, &v, sizeof v) < 0 && errno == EINTR)
                ;
            q->signalled = 0;
        } else if (d && !q->signalled) {   /* left for the next call */
            diskq_signal(q->efd);
            q->signalled = 1;
        }
        pthread_mutex_unlock(&q->mu);
    }
    if (q->pump)   /* what waited for these (a flush behind writes) may start now */
        q->pump(q);
    return (int)n;
}

void blkpy_queue_free(struct blkpy_disk_queue *q)
{
    if (!q)
        return;
    uint64_t ud[64];
    int64_t res[64];
    /* Never while the library may still write into the ops or post them. */
    while (blkpy_queue_outstanding(q)) {
        struct pollfd p = {.fd = q->efd, .events = POLLIN};
        poll(&p, 1, 1000);
        blkpy_queue_reap(q, ud, res, 64);
    }
    pthread_mutex_lock(&q->mu);   /* the last poster has let go of it */
    pthread_mutex_unlock(&q->mu);
    while (q->head) {
        struct blkpy_queue_done *d = q->head;
        q->head = d->next;
        free(d);
    }
    close(q->efd);
    pthread_mutex_destroy(&q->mu);
    free(q);   /* the implementation's queue it is the first member of */
}
