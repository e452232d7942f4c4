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
static int64_t do_one(const struct blkpy_io *io, const struct iovec *iov_in)
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
        ios[i].result = do_one(&ios[i], iovs + ios[i].iov_first);
        if (ios[i].result < 0)
            failed++;
    }
    return failed;
}
