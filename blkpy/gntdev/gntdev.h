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
/* One entry: bytes transferred (a read past EOF is zero-filled) or -errno. */
int64_t blkpy_io_one(const struct blkpy_io *io, const struct iovec *iov);
/* Runs every I/O of the batch in order; returns the number of failed entries. */
int blkpy_io_batch(struct blkpy_io *ios, int n, const struct iovec *iovs);
/* ---- shared-memory atomics (sim grant table and event-channel table, across processes) ---- */
uint16_t blkpy_load16(const void *addr);
void blkpy_store16(void *addr, uint16_t value);
uint64_t blkpy_load64(const void *addr);
void blkpy_store64(void *addr, uint64_t value);
/* Compare-and-swap; returns 1 if *addr was `expected` and now holds `desired`. */
int blkpy_cas32(void *addr, uint32_t expected, uint32_t desired);
int blkpy_cas64(void *addr, uint64_t expected, uint64_t desired);

/* ---- raw mmap/munmap (one syscall each; Python's mmap module would dup the fd) ---- */
/* Returns the address, or -errno. */
int64_t blkpy_mmap(int fd, uint64_t length, int prot, int flags, uint64_t offset);
int blkpy_munmap(uint64_t addr, uint64_t length);   /* 0 or -errno */

/* ---- the simulated hypervisor's grant operations ---- */
/* One grant-copy segment, byte-identical to blkpy.platform.COPY_SEGMENT_DTYPE. */
struct blkpy_copy_segment {
    uint64_t local_addr;
    uint32_t ref;
    uint16_t domid;
    uint16_t offset;
    uint16_t length;
    uint8_t to_guest;
    uint8_t pad;
    int16_t status;
    uint16_t pad2;
};

/* What one backend process knows of one guest domain's grants. */
struct blkpy_sim_grants {
    uint32_t *table;        /* shared v1 grant table: per ref {flags | domid << 16, frame} */
    uint32_t nr_grants;
    uint32_t nr_frames;     /* guest memory size in pages */
    uint8_t *memory;        /* the hypervisor's view of all guest memory */
    uint32_t *pins;         /* process-local, per ref {all pins, writable pins} */
    uint32_t *frames;       /* process-local, per ref: the frame read when first pinned */
    uint16_t guest_domid;
    uint16_t backend_domid;
};
/* Pins refs[0..n) like Xen's map hypercall (sets GTF_reading / GTF_writing in the shared
 * entry) and writes their frames. Returns n, or the index i of the first bad ref with its
 * GNTST_* code in *status; then nothing stays pinned. */
int blkpy_sim_grant_acquire(struct blkpy_sim_grants *g, const uint32_t *refs, int n,
                            int writable, uint32_t *frames_out, int16_t *status);
void blkpy_sim_grant_release(struct blkpy_sim_grants *g, const uint32_t *refs, int n,
                             int writable);
/* Maps frames[0..n) of the guest memory file `fd` contiguously (PROT_READ only unless
 * writable). Returns the address or -errno (nothing mapped then). */
int64_t blkpy_sim_map_frames(int fd, const uint32_t *frames, int n, int writable);
/* Runs the segments whose domid is g->guest_domid; others are left untouched.
 * Returns how many of the segments it ran failed. */
int blkpy_sim_grant_copy(struct blkpy_sim_grants *g, struct blkpy_copy_segment *segs, int n);
/* CDEF-END */

#endif
