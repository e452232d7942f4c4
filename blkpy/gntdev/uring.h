/* blkpy's io_uring engine core: submit a batch of reads/writes/flushes, reap completions.
 * Raw system calls against the kernel's uapi header, so no liburing is needed. */
#ifndef BLKPY_URING_H
#define BLKPY_URING_H
#include <stdint.h>

/* CDEF-BEGIN */
struct blkpy_uio {
    int32_t fd;
    int32_t op;          /* 0 readv, 1 writev, 2 fdatasync (drains everything before it) */
    uint64_t offset;
    uint64_t iov_addr;   /* struct iovec array, alive until the op completes */
    uint32_t iov_count;
    uint32_t _pad;
    uint64_t user_data;
};
struct blkpy_uring;
/* A ring of `entries` submission slots whose completions are signalled on eventfd
 * `efd` (-1: none). NULL on failure with *err = errno. */
struct blkpy_uring *blkpy_uring_new(unsigned entries, int efd, int *err);
void blkpy_uring_free(struct blkpy_uring *ring);
/* Queue and submit up to n ops; returns how many were queued or -errno. */
int blkpy_uring_submit(struct blkpy_uring *ring, const struct blkpy_uio *ops, int n);
/* Queue up to n ops without a system call; returns how many fit (or -EINVAL). */
int blkpy_uring_queue(struct blkpy_uring *ring, const struct blkpy_uio *ops, int n);
/* Submit everything queued: the io_uring_enter calls it took (0: nothing was queued)
 * or -errno. */
int blkpy_uring_enter(struct blkpy_uring *ring);
/* Collect up to max completions, blocking until at least min_complete exist. */
int blkpy_uring_reap(struct blkpy_uring *ring, uint64_t *user_data, int64_t *res, int max,
                     int min_complete);
/* Completions are waiting in the CQ ring (no system call). */
int blkpy_uring_ready(const struct blkpy_uring *ring);
/* CDEF-END */
#endif
