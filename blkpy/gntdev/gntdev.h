/* blkpy native helper: the few things Python cannot do cheaply or safely.
 *  - memory fences and single 32-bit loads/stores for the shared ring indices
 *  - batched preadv/pwritev over many requests in one call (GIL released by cffi)
 *  - gntdev / evtchn ioctls and mmap for the linux platform
 *  - contiguous remapping of shared guest frames for the sim platform
 */
#ifndef BLKPY_GNTDEV_H
#define BLKPY_GNTDEV_H
#include <stdint.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

/* CDEF-BEGIN */
/* ---- ring barriers (blkif.md 7.4) ---- */
void blkpy_mb(void);
void blkpy_rmb(void);
void blkpy_wmb(void);
uint32_t blkpy_load32(const void *addr);
void blkpy_store32(void *addr, uint32_t value);

/* ---- batched file I/O ---- */
struct blkpy_io {
    int32_t fd;
    int32_t op;          /* 0 = read (preadv), 1 = write (pwritev) */
    uint64_t offset;     /* byte offset in fd */
    uint32_t iov_first;  /* index of the first iovec in the shared iovec array */
    uint32_t iov_count;
    int64_t result;      /* out: bytes transferred or -errno */
};
/* Runs every I/O of the batch in order; returns the number of failed entries. */
int blkpy_io_batch(struct blkpy_io *ios, int n, const struct iovec *iovs);
/* CDEF-END */

#endif
