/* See uring.h. One submission per batch (io_uring_enter), completions read from the
 * shared CQ ring without a system call unless the caller asks to wait. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>

struct blkpy_uring {
    int fd;
    unsigned sq_entries, cq_entries;
    unsigned unsubmitted;   /* queued in the SQ ring, not yet passed to io_uring_enter */
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
};

static int sys_setup(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags)
{
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

void blkpy_uring_free(struct blkpy_uring *r)
{
    if (!r)
        return;
    if (r->sqes && r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

struct blkpy_uring *blkpy_uring_new(unsigned entries, int efd, int *err)
{
    struct io_uring_params p;
    struct blkpy_uring *r = calloc(1, sizeof(*r));
    if (!r) {
        *err = ENOMEM;
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    r->fd = sys_setup(entries, &p);
    if (r->fd < 0) {
        *err = errno;
        free(r);
        return NULL;
    }
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len)
            r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        r->cq_map = r->sq_map;
    else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED)
            goto fail;
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        goto fail;
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    if (efd >= 0 && syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_EVENTFD, &efd, 1) < 0)
        goto fail;
    return r;
fail:
    *err = errno;
    blkpy_uring_free(r);
    return NULL;
}

int blkpy_uring_queue(struct blkpy_uring *r, const struct blkpy_uio *ops, int n)
{
    unsigned tail = *r->sq_tail;
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    unsigned room = r->sq_entries - (tail - head);
    int queued = 0;
    if ((unsigned)n > room)
        n = (int)room;
    for (; queued < n; queued++) {
        const struct blkpy_uio *op = &ops[queued];
        unsigned idx = tail & *r->sq_mask;
        struct io_uring_sqe *sqe = &r->sqes[idx];
        memset(sqe, 0, sizeof(*sqe));
        sqe->fd = op->fd;
        sqe->user_data = op->user_data;
        switch (op->op) {
        case 0:
        case 1:
            sqe->opcode = op->op ? IORING_OP_WRITEV : IORING_OP_READV;
            sqe->off = op->offset;
            sqe->addr = op->iov_addr;
            sqe->len = op->iov_count;
            break;
        case 2:
            /* A flush waits for every earlier op and holds back later ones: the
             * ordering a barrier or a flush-with-data needs. */
            sqe->opcode = IORING_OP_FSYNC;
            sqe->fsync_flags = IORING_FSYNC_DATASYNC;
            sqe->flags = IOSQE_IO_DRAIN;
            break;
        default:
            return -EINVAL;   /* nothing of this call is published */
        }
        r->sq_array[idx] = idx;
        tail++;
    }
    __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
    r->unsubmitted += (unsigned)queued;
    return queued;
}

int blkpy_uring_enter(struct blkpy_uring *r)
{
    int calls = 0;
    while (r->unsubmitted > 0) {
        calls++;
        int ret = sys_enter(r->fd, r->unsubmitted, 0, 0);
        if (ret < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        r->unsubmitted -= (unsigned)ret;
    }
    return calls;
}

int blkpy_uring_submit(struct blkpy_uring *r, const struct blkpy_uio *ops, int n)
{
    int queued = blkpy_uring_queue(r, ops, n);
    if (queued < 0)
        return queued;
    int err = blkpy_uring_enter(r);
    return err < 0 ? err : queued;
}

int blkpy_uring_reap(struct blkpy_uring *r, uint64_t *user_data, int64_t *res, int max,
                     int min_complete)
{
    int got = 0;
    for (;;) {
        unsigned head = *r->cq_head;
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        while (head != tail && got < max) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            user_data[got] = cqe->user_data;
            res[got] = cqe->res;
            got++;
            head++;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
        if (got >= min_complete || got >= max)
            return got;
        int ret = sys_enter(r->fd, 0, (unsigned)(min_complete - got), IORING_ENTER_GETEVENTS);
        if (ret < 0 && errno != EINTR)
            return got ? got : -errno;
    }
}

int blkpy_uring_ready(const struct blkpy_uring *r)
{
    return *r->cq_head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
}
