/* See gntdev.h for what lives here and why. */
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

/* ---------------- ring barriers ---------------- */

void blkpy_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void blkpy_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
void blkpy_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

uint32_t blkpy_load32(const void *addr)
{
    return __atomic_load_n((const uint32_t *)addr, __ATOMIC_ACQUIRE);
}

void blkpy_store32(void *addr, uint32_t value)
{
    __atomic_store_n((uint32_t *)addr, value, __ATOMIC_RELEASE);
}

/* ---------------- batched file I/O ---------------- */

#define BLKPY_IOV_MAX 1024

/* One preadv/pwritev, retried until complete: short transfers happen on signals
 * and near EOF. A read past EOF of a file (a sparse tail) is zero-filled. */
int64_t blkpy_io_one(const struct blkpy_io *io, const struct iovec *iov_in)
{
    struct iovec iov[BLKPY_IOV_MAX];
    int cnt = (int)io->iov_count;
    int64_t done = 0;
    off_t off = (off_t)io->offset;

    if (cnt <= 0 || cnt > BLKPY_IOV_MAX)
        return -EINVAL;
    memcpy(iov, iov_in, sizeof(struct iovec) * (size_t)cnt);
    struct iovec *cur = iov;
    while (cnt > 0) {
        ssize_t r = io->op ? pwritev(io->fd, cur, cnt, off) : preadv(io->fd, cur, cnt, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0) {
            if (io->op)
                return -EIO;
            for (int i = 0; i < cnt; i++) {   /* EOF: the rest reads as zeros */
                memset(cur[i].iov_base, 0, cur[i].iov_len);
                done += (int64_t)cur[i].iov_len;
            }
            return done;
        }
        done += r;
        off += r;
        while (cnt > 0 && (size_t)r >= cur->iov_len) {
            r -= (ssize_t)cur->iov_len;
            cur++;
            cnt--;
        }
        if (cnt > 0 && r > 0) {
            cur->iov_base = (char *)cur->iov_base + r;
            cur->iov_len -= (size_t)r;
        }
    }
    return done;
}

int blkpy_io_batch(struct blkpy_io *ios, int n, const struct iovec *iovs)
{
    int failed = 0;
    for (int i = 0; i < n; i++) {
        ios[i].result = blkpy_io_one(&ios[i], iovs + ios[i].iov_first);
        if (ios[i].result < 0)
            failed++;
    }
    return failed;
}

/* ---------------- shared-memory atomics ---------------- */

uint16_t blkpy_load16(const void *addr)
{
    return __atomic_load_n((const uint16_t *)addr, __ATOMIC_ACQUIRE);
}

void blkpy_store16(void *addr, uint16_t value)
{
    __atomic_store_n((uint16_t *)addr, value, __ATOMIC_RELEASE);
}

uint64_t blkpy_load64(const void *addr)
{
    return __atomic_load_n((const uint64_t *)addr, __ATOMIC_ACQUIRE);
}

void blkpy_store64(void *addr, uint64_t value)
{
    __atomic_store_n((uint64_t *)addr, value, __ATOMIC_RELEASE);
}

int blkpy_cas32(void *addr, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n((uint32_t *)addr, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

int blkpy_cas64(void *addr, uint64_t expected, uint64_t desired)
{
    return __atomic_compare_exchange_n((uint64_t *)addr, &expected, desired, 0,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

/* ---------------- mmap ---------------- */

#include <sys/mman.h>

int64_t blkpy_mmap(int fd, uint64_t length, int prot, int flags, uint64_t offset)
{
    void *addr = mmap(NULL, (size_t)length, prot, flags, fd, (off_t)offset);
    if (addr == MAP_FAILED)
        return -errno;
    return (int64_t)(uintptr_t)addr;
}

int blkpy_munmap(uint64_t addr, uint64_t length)
{
    return munmap((void *)(uintptr_t)addr, (size_t)length) ? -errno : 0;
}

/* ---------------- simulated hypervisor: grants ---------------- */

#define SIM_PAGE_SIZE 4096u
#define GTF_TYPE_MASK 3u
#define GTF_PERMIT_ACCESS 1u
#define GTF_READONLY 0x4u
#define GTF_READING 0x8u
#define GTF_WRITING 0x10u
#define GNTST_OKAY 0
#define GNTST_BAD_GNTREF (-3)
#define GNTST_PERMISSION_DENIED (-8)
#define GNTST_BAD_PAGE (-9)
#define GNTST_BAD_COPY_ARG (-10)

/* The flags and domid of a v1 entry share one 32-bit word, so one CAS checks the domid
 * and sets the status bits together, as Xen's _set_status_v1 does. The guest may rewrite
 * the entry at any time; only the CAS result counts. */
static int16_t acquire_one(struct blkpy_sim_grants *g, uint32_t ref, int writable,
                           uint32_t *frame_out)
{
    if (ref >= g->nr_grants)
        return GNTST_BAD_GNTREF;
    uint32_t *word = &g->table[2 * (size_t)ref];
    uint32_t *pin = &g->pins[2 * (size_t)ref];
    uint32_t set = GTF_READING | (writable ? GTF_WRITING : 0);
    uint32_t cur = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (;;) {
        uint32_t flags = cur & 0xffffu, domid = cur >> 16;
        if ((flags & GTF_TYPE_MASK) != GTF_PERMIT_ACCESS)
            return GNTST_BAD_GNTREF;
        if (domid != g->backend_domid)
            return GNTST_PERMISSION_DENIED;
        if (writable && (flags & GTF_READONLY))
            return GNTST_PERMISSION_DENIED;
        if ((cur | set) == cur)
            break;
        if (__atomic_compare_exchange_n(word, &cur, cur | set, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_ACQUIRE))
            break;
    }
    if (pin[0] == 0) {
        /* First pin: the frame is read after the status bits are set, so the guest can
         * no longer revoke it; later pins use this frame even if the guest rewrites it. */
        uint32_t frame = __atomic_load_n(&word[1], __ATOMIC_ACQUIRE);
        if (frame >= g->nr_frames) {
            __atomic_fetch_and(word, ~(GTF_READING | GTF_WRITING), __ATOMIC_SEQ_CST);
            return GNTST_BAD_PAGE;
        }
        g->frames[ref] = frame;
    }
    pin[0]++;
    if (writable)
        pin[1]++;
    *frame_out = g->frames[ref];
    return GNTST_OKAY;
}

static void release_one(struct blkpy_sim_grants *g, uint32_t ref, int writable)
{
    uint32_t *word = &g->table[2 * (size_t)ref];
    uint32_t *pin = &g->pins[2 * (size_t)ref];
    pin[0]--;
    if (writable && --pin[1] == 0)
        __atomic_fetch_and(word, ~GTF_WRITING, __ATOMIC_SEQ_CST);
    if (pin[0] == 0)
        __atomic_fetch_and(word, ~(GTF_READING | GTF_WRITING), __ATOMIC_SEQ_CST);
}

int blkpy_sim_grant_acquire(struct blkpy_sim_grants *g, const uint32_t *refs, int n,
                            int writable, uint32_t *frames_out, int16_t *status)
{
    for (int i = 0; i < n; i++) {
        int16_t st = acquire_one(g, refs[i], writable, &frames_out[i]);
        if (st != GNTST_OKAY) {
            blkpy_sim_grant_release(g, refs, i, writable);
            *status = st;
            return i;
        }
    }
    *status = GNTST_OKAY;
    return n;
}

void blkpy_sim_grant_release(struct blkpy_sim_grants *g, const uint32_t *refs, int n,
                             int writable)
{
    for (int i = n - 1; i >= 0; i--)
        release_one(g, refs[i], writable);
}

int64_t blkpy_sim_map_frames(int fd, const uint32_t *frames, int n, int writable)
{
    if (n <= 0)
        return -EINVAL;
    size_t length = (size_t)n * SIM_PAGE_SIZE;
    /* Reserve the whole range first so the pages land contiguously. */
    char *base = mmap(NULL, length, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return -errno;
    int prot = PROT_READ | (writable ? PROT_WRITE : 0);
    for (int i = 0; i < n;) {
        int run = 1;   /* consecutive frames map with one call (and one VMA) */
        while (i + run < n && frames[i + run] == frames[i] + (uint32_t)run)
            run++;
        void *at = mmap(base + (size_t)i * SIM_PAGE_SIZE, (size_t)run * SIM_PAGE_SIZE, prot,
                        MAP_SHARED | MAP_FIXED, fd, (off_t)frames[i] * SIM_PAGE_SIZE);
        if (at == MAP_FAILED) {
            int err = errno;
            munmap(base, length);
            return -err;
        }
        i += run;
    }
    return (int64_t)(uintptr_t)base;
}

int blkpy_sim_grant_copy(struct blkpy_sim_grants *g, struct blkpy_copy_segment *segs, int n)
{
    int failed = 0;
    for (int i = 0; i < n; i++) {
        struct blkpy_copy_segment *s = &segs[i];
        if (s->domid != g->guest_domid)
            continue;
        if ((uint32_t)s->offset + s->length > SIM_PAGE_SIZE) {
            s->status = GNTST_BAD_COPY_ARG;
            failed++;
            continue;
        }
        uint32_t frame;
        /* Pinned for the copy only, as Xen's acquire_grant_for_copy does. */
        s->status = acquire_one(g, s->ref, s->to_guest, &frame);
        if (s->status != GNTST_OKAY) {
            failed++;
            continue;
        }
        uint8_t *page = g->memory + (size_t)frame * SIM_PAGE_SIZE + s->offset;
        void *local = (void *)(uintptr_t)s->local_addr;
        if (s->to_guest)
            memcpy(page, local, s->length);
        else
            memcpy(local, page, s->length);
        release_one(g, s->ref, s->to_guest);
    }
    return failed;
}
