/* blkpy's NBD client core (see nbdio.h). Whoever holds `drive_mu` drives the libnbd
 * handle and does everything about the commands (issuing, ordering, accounting,
 * retrying): the connection thread, or a submitting or watching thread. Submitters
 * append ops to `incoming` under `mu`, then issue them themselves if `drive_mu` is free
 * (libnbd sends at once), else wake the connection thread if it sleeps. A ring loop that
 * watches the connection reads the replies itself (`drive`, when `sock_ep`, an epoll set
 * holding the current socket, is readable in its own epoll set): the connection thread
 * then leaves the socket to it, and a request at queue depth 1 costs no thread switch
 * beyond the server's. The connection thread keeps what may block or take time:
 * reconnecting, sends the socket could not take at once, the stall timer.
 *
 * `drive_mu` is never held across a blocking call. `mu` guards `incoming`, the
 * connection state and the export's info as other threads read them (the state changes
 * under both); `done_mu` guards the list libnbd's completion callbacks append to (they
 * run inside libnbd calls, under `drive_mu`, whose holder accounts them before letting
 * go); completed ops go to their queue's completion list (diskq.c). */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include(<libnbd.h>)
#define BLKPY_HAVE_LIBNBD 1
#endif
#endif

#ifndef BLKPY_HAVE_LIBNBD

int blkpy_nbd_available(char *msg, uint32_t msglen)
{
    snprintf(msg, msglen, "blkpy was built without libnbd's headers (install libnbd-dev "
             "and reinstall blkpy)");
    return 0;
}
struct blkpy_nbd *blkpy_nbd_open(const char *uri, int readonly, int64_t connect_ms,
                                 int64_t reconnect_ms, int64_t stall_ms, char *msg,
                                 uint32_t msglen)
{
    (void)uri, (void)readonly, (void)connect_ms, (void)reconnect_ms, (void)stall_ms;
    blkpy_nbd_available(msg, msglen);
    return NULL;
}
void blkpy_nbd_get_info(struct blkpy_nbd *c, struct blkpy_nbd_info *info) { (void)c, (void)info; }
void blkpy_nbd_get_stats(struct blkpy_nbd *c, struct blkpy_nbd_stats *s) { (void)c, (void)s; }
void blkpy_nbd_drop(struct blkpy_nbd *c) { (void)c; }
void blkpy_nbd_give_up(struct blkpy_nbd *c) { (void)c; }
void blkpy_nbd_close(struct blkpy_nbd *c) { (void)c; }
struct blkpy_disk_queue *blkpy_nbd_queue_new(struct blkpy_nbd *c) { (void)c; return NULL; }

#else /* BLKPY_HAVE_LIBNBD */

#include <dlfcn.h>
#include <libnbd.h>
#include <sys/socket.h>

/* Every libnbd function used, looked up once with dlsym. */
#define NBDIO_FUNCS(X)                                                                    \
    X(nbd_create) X(nbd_close) X(nbd_get_error) X(nbd_get_errno)                          \
    X(nbd_set_pread_initialize) X(nbd_set_uri_allow_local_file)                           \
    X(nbd_aio_connect_uri) X(nbd_aio_is_ready) X(nbd_aio_is_dead) X(nbd_aio_is_closed)    \
    X(nbd_aio_get_fd) X(nbd_aio_get_direction) X(nbd_aio_notify_read)                     \
    X(nbd_aio_notify_write) X(nbd_aio_pread) X(nbd_aio_pwrite) X(nbd_aio_flush)           \
    X(nbd_aio_trim) X(nbd_aio_zero) X(nbd_aio_disconnect) X(nbd_get_size)                 \
    X(nbd_is_read_only) X(nbd_can_flush) X(nbd_can_trim) X(nbd_can_zero)                  \
    X(nbd_can_multi_conn) X(nbd_get_block_size) X(nbd_get_structured_replies_negotiated) \
    X(nbd_get_tls_negotiated)

static struct {
#define NBDIO_MEMBER(f) __typeof__(f) *f;
    NBDIO_FUNCS(NBDIO_MEMBER)
} nbdio_lib;
static pthread_once_t nbdio_once = PTHREAD_ONCE_INIT;
static char nbdio_load_error[256];
#define L(f) (nbdio_lib.f)

static void nbdio_load(void)
{
    void *so = dlopen("libnbd.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!so) {
        snprintf(nbdio_load_error, sizeof nbdio_load_error, "cannot load libnbd: %s",
                 dlerror());
        return;
    }
#define NBDIO_LOOKUP(f)                                                                   \
    if (!(nbdio_lib.f = (__typeof__(f) *)dlsym(so, #f))) {                                \
        snprintf(nbdio_load_error, sizeof nbdio_load_error, "libnbd lacks " #f);          \
        return;                                                                           \
    }
    NBDIO_FUNCS(NBDIO_LOOKUP)
}

int blkpy_nbd_available(char *msg, uint32_t msglen)
{
    pthread_once(&nbdio_once, nbdio_load);
    if (nbdio_load_error[0]) {
        snprintf(msg, msglen, "%s", nbdio_load_error);
        return 0;
    }
    return 1;
}

enum { NBDIO_READ, NBDIO_WRITE, NBDIO_FLUSH, NBDIO_ZERO, NBDIO_TRIM };
enum { NBDIO_UP, NBDIO_DOWN, NBDIO_EXPIRED };

/* libnbd refuses reads and writes over 64 MiB; servers commonly advertise 32 MiB. */
#define NBDIO_MAX_IO (32u << 20)
/* Zero and trim carry no payload but a 32-bit length. */
#define NBDIO_MAX_ZERO (1ull << 30)
/* A command that keeps failing with the connection (one that crashes the server, say)
 * is failed after this many attempts rather than retried for ever. */
#define NBDIO_MAX_ATTEMPTS 16
#define NBDIO_BACKOFF_MIN_MS 20
#define NBDIO_BACKOFF_MAX_MS 1000
#define NBDIO_DISCONNECT_MS 2000
/* After blkpy_nbd_give_up: how long a request may wait for a reply. */
#define NBDIO_GIVE_UP_STALL_MS 2000

struct nbdio_op {
    struct blkpy_queue_done done;   /* first: the completion list frees the op */
    struct blkpy_nbd_queue *q;
    uint32_t kind;
    uint32_t iovcnt;
    uint64_t offset, length;
    const struct iovec *iov;
    uint32_t cmds_left;
    int err;
    struct nbdio_op *next;
};

struct nbdio_cmd {
    struct blkpy_nbd *c;
    struct nbdio_op *op;
    uint64_t seq;          /* issue order, kept across retries */
    uint32_t kind;
    uint32_t attempts;
    uint64_t offset, length;
    void *buf;
    int err;
    struct nbdio_cmd *next;
};

struct blkpy_nbd_queue {
    struct blkpy_disk_queue dq;   /* first: the queue is freed through it */
    struct blkpy_nbd *c;
};

struct blkpy_nbd {
    char *uri;
    int readonly;
    int64_t connect_ms, reconnect_ms, stall_ms;
    int64_t progress_ms;                      /* last reply, or when the wait began */
    pthread_mutex_t drive_mu;                 /* the handle and what follows, to `done` */
    pthread_mutex_t mu;
    struct nbd_handle *h;
    int state;
    int64_t down_since_ms;
    struct blkpy_nbd_info info;
    struct nbdio_op *in_head, *in_tail;       /* submitted, not yet taken (under mu) */
    struct nbdio_op *wait_head, *wait_tail;   /* taken, not yet issued, in order */
    struct nbdio_cmd *retry;                  /* lost with the connection */
    uint32_t n_retry;
    struct nbdio_op *fence;                   /* a flush or discard running alone */
    uint64_t in_flight;                       /* commands libnbd holds */
    uint64_t seq;
    struct blkpy_nbd_stats stats;
    pthread_mutex_t done_mu;
    struct nbdio_cmd *done;                   /* finished by libnbd, not yet accounted */
    int kick_fd;
    int sock_ep;                              /* epoll set of the current socket */
    int watchers;                             /* ring loops reading replies (atomic) */
    pthread_t thread;
    int thread_started;
    int stop;
    int drop;
    int give_up;   /* blkpy_nbd_give_up was called (atomic) */
    int idle;   /* the connection thread is asleep in poll (under mu) */
};

static int64_t nbdio_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int nbdio_giving_up(struct blkpy_nbd *c)
{
    return __atomic_load_n(&c->give_up, __ATOMIC_ACQUIRE);
}

/* How long requests may go without a reply before the connection is dropped (0: no
 * limit). */
static int64_t nbdio_stall_ms(struct blkpy_nbd *c)
{
    if (nbdio_giving_up(c) && (c->stall_ms <= 0 || c->stall_ms > NBDIO_GIVE_UP_STALL_MS))
        return NBDIO_GIVE_UP_STALL_MS;
    return c->stall_ms;
}

static void nbdio_signal(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

static void nbdio_drain_fd(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof v) < 0 && errno == EINTR)
        ;
}

/* libnbd's message for the call that just failed (it names the call itself). */
static void nbdio_error(char *msg, uint32_t msglen)
{
    const char *e = L(nbd_get_error)();
    snprintf(msg, msglen, "%s", e && *e ? e : "unknown libnbd error");
}

static void nbdio_fill_info(struct nbd_handle *h, struct blkpy_nbd_info *i)
{
    int64_t size = L(nbd_get_size)(h);
    i->size = size > 0 ? (uint64_t)size : 0;
    i->read_only = L(nbd_is_read_only)(h) == 1;
    i->can_flush = L(nbd_can_flush)(h) == 1;
    i->can_trim = L(nbd_can_trim)(h) == 1;
    i->can_zero = L(nbd_can_zero)(h) == 1;
    i->can_multi_conn = L(nbd_can_multi_conn)(h) == 1;
    i->structured_replies = L(nbd_get_structured_replies_negotiated)(h) == 1;
    i->tls = L(nbd_get_tls_negotiated)(h) == 1;
    int64_t b = L(nbd_get_block_size)(h, LIBNBD_SIZE_MINIMUM);
    i->block_min = b > 0 ? (uint32_t)b : 0;
    b = L(nbd_get_block_size)(h, LIBNBD_SIZE_PREFERRED);
    i->block_preferred = b > 0 ? (uint32_t)b : 0;
    b = L(nbd_get_block_size)(h, LIBNBD_SIZE_MAXIMUM);
    i->block_max = b > 0 ? (uint32_t)b : 0;
}

/* Move the handle's state machine along after poll() said what happened on fd. */
static int nbdio_notify(struct nbd_handle *h, short revents)
{
    unsigned dir = L(nbd_aio_get_direction)(h);
    int r = 0;
    if ((revents & (POLLIN | POLLHUP | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_READ))
        r = L(nbd_aio_notify_read)(h);
    else if ((revents & (POLLOUT | POLLHUP | POLLERR)) && (dir & LIBNBD_AIO_DIRECTION_WRITE))
        r = L(nbd_aio_notify_write)(h);
    return r;
}

static short nbdio_events(struct nbd_handle *h)
{
    unsigned dir = L(nbd_aio_get_direction)(h);
    return (short)(((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                   ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0));
}

/* nbdio_notify with what fd is ready for among events now, asked under drive_mu: another
 * thread may have read or sent since the caller looked, and libnbd takes a read event in
 * the middle of a send as the sign of a reply to pause it for (one that never comes
 * leaves the send paused with the server waiting for the rest of it). */
static void nbdio_notify_ready(struct nbd_handle *h, int fd, short events)
{
    struct pollfd p = {fd, events, 0};
    if (fd >= 0 && poll(&p, 1, 0) > 0)
        nbdio_notify(h, p.revents);
}

/* A connected handle within timeout_ms, or NULL with the reason in msg. */
static struct nbd_handle *nbdio_connect(const char *uri, int64_t timeout_ms,
                                        const int *stop, char *msg, uint32_t msglen)
{
    struct nbd_handle *h = L(nbd_create)();
    if (!h) {
        nbdio_error(msg, msglen);
        return NULL;
    }
    /* Reads land in the guest's own pages: pre-zeroing them would only cost a memset
     * per read, and a short reply can show the guest nothing but its own memory. */
    L(nbd_set_pread_initialize)(h, false);
    /* The target is the operator's: its tls-psk-file/tls-certificates may name files. */
    L(nbd_set_uri_allow_local_file)(h, true);
    if (L(nbd_aio_connect_uri)(h, uri) == -1) {
        nbdio_error(msg, msglen);
        goto fail;
    }
    int64_t deadline = nbdio_now_ms() + timeout_ms;
    while (L(nbd_aio_is_ready)(h) != 1) {
        if (L(nbd_aio_is_dead)(h) == 1 || L(nbd_aio_is_closed)(h) == 1) {
            nbdio_error(msg, msglen);
            goto fail;
        }
        int64_t left = deadline - nbdio_now_ms();
        if (left <= 0 || (stop && __atomic_load_n(stop, __ATOMIC_RELAXED))) {
            snprintf(msg, msglen, "connect: no NBD handshake within %lld ms",
                     (long long)timeout_ms);
            goto fail;
        }
        struct pollfd p = {L(nbd_aio_get_fd)(h), nbdio_events(h), 0};
        if (p.fd < 0) {
            nbdio_error(msg, msglen);
            goto fail;
        }
        int n = poll(&p, 1, left < 100 ? (int)left : 100);
        if (n > 0 && nbdio_notify(h, p.revents) == -1) {
            nbdio_error(msg, msglen);
            goto fail;
        }
    }
    return h;
fail:
    L(nbd_close)(h);
    return NULL;
}

/* ---- completion side ------------------------------------------------------------- */

static void nbdio_post(struct nbdio_op *op)
{
    op->done.result = op->err ? -(int64_t)op->err : 0;
    blkpy_queue_post(&op->q->dq, &op->done);
}

static void nbdio_op_end(struct blkpy_nbd *c, struct nbdio_op *op, int err)
{
    if (err && !op->err)
        op->err = err;
    if (op->err)
        __atomic_store_n(&c->stats.last_errno, op->err, __ATOMIC_RELAXED);
    if (c->fence == op)
        c->fence = NULL;
    nbdio_post(op);
}

static void nbdio_cmd_end(struct blkpy_nbd *c, struct nbdio_cmd *cmd, int err)
{
    struct nbdio_op *op = cmd->op;
    free(cmd);
    if (err && !op->err)
        op->err = err;
    if (--op->cmds_left == 0)
        nbdio_op_end(c, op, 0);
}

/* libnbd's completion callback (inside a libnbd call under drive_mu): record. */
static int nbdio_callback(void *user_data, int *error)
{
    struct nbdio_cmd *cmd = user_data;
    struct blkpy_nbd *c = cmd->c;
    cmd->err = *error;
    pthread_mutex_lock(&c->done_mu);
    cmd->next = c->done;
    c->done = cmd;
    pthread_mutex_unlock(&c->done_mu);
    return 1;   /* retire the command: we keep no cookie; drive_mu's holder accounts it */
}

/* drive_mu held, state UP. */
static void nbdio_issue(struct blkpy_nbd *c, struct nbdio_cmd *cmd)
{
    nbd_completion_callback cb = {.callback = nbdio_callback, .user_data = cmd};
    struct nbd_handle *h = c->h;
    int64_t r = -1;
    cmd->attempts++;
    if (c->in_flight++ == 0)
        c->progress_ms = nbdio_now_ms();
    __atomic_fetch_add(&c->stats.commands, 1, __ATOMIC_RELAXED);
    switch (cmd->kind) {
    case NBDIO_READ:
        r = L(nbd_aio_pread)(h, cmd->buf, cmd->length, cmd->offset, cb, 0);
        break;
    case NBDIO_WRITE:
        r = L(nbd_aio_pwrite)(h, cmd->buf, cmd->length, cmd->offset, cb, 0);
        break;
    case NBDIO_FLUSH:
        r = L(nbd_aio_flush)(h, cb, 0);
        break;
    case NBDIO_ZERO:   /* no NO_HOLE flag: the server may release the space */
        r = L(nbd_aio_zero)(h, cmd->length, cmd->offset, cb, 0);
        break;
    case NBDIO_TRIM:
        r = L(nbd_aio_trim)(h, cmd->length, cmd->offset, cb, 0);
        break;
    }
    if (r == -1) {
        /* Not queued, so libnbd never calls back: account it like a completion. */
        int err = L(nbd_get_errno)();
        int dead = L(nbd_aio_is_dead)(h) == 1 || L(nbd_aio_is_closed)(h) == 1;
        cmd->err = dead ? ENOTCONN : (err ? err : EIO);
        pthread_mutex_lock(&c->done_mu);
        cmd->next = c->done;
        c->done = cmd;
        pthread_mutex_unlock(&c->done_mu);
    }
}

static struct nbdio_cmd *nbdio_cmd_new(struct blkpy_nbd *c, struct nbdio_op *op,
                                       uint32_t kind, uint64_t offset, uint64_t length,
                                       void *buf)
{
    struct nbdio_cmd *cmd = calloc(1, sizeof *cmd);
    if (cmd) {
        cmd->c = c;
        cmd->op = op;
        cmd->kind = kind;
        cmd->offset = offset;
        cmd->length = length;
        cmd->buf = buf;
    }
    return cmd;
}

/* Split op into commands (address-contiguous runs of its iovec for reads and writes),
 * then issue them. drive_mu held, state UP. */
static void nbdio_start(struct blkpy_nbd *c, struct nbdio_op *op)
{
    const struct blkpy_nbd_info *in = &c->info;
    int writes = op->kind == NBDIO_WRITE || op->kind == NBDIO_ZERO || op->kind == NBDIO_TRIM;
    if (writes && (c->readonly || in->read_only)) {
        nbdio_op_end(c, op, EROFS);
        return;
    }
    if (op->kind != NBDIO_FLUSH &&
        (op->offset > in->size || op->length > in->size - op->offset)) {
        nbdio_op_end(c, op, EINVAL);
        return;
    }
    struct nbdio_cmd *first = NULL, **link = &first;
    uint32_t n = 0;
    if (op->kind == NBDIO_READ || op->kind == NBDIO_WRITE) {
        uint64_t max = in->block_max && in->block_max < NBDIO_MAX_IO ? in->block_max
                                                                     : NBDIO_MAX_IO;
        uint64_t off = op->offset, total = 0;
        uint32_t k = 0;
        while (k < op->iovcnt) {
            char *base = op->iov[k].iov_base;
            uint64_t len = op->iov[k].iov_len;
            for (k++; k < op->iovcnt && (char *)op->iov[k].iov_base == base + len &&
                      len + op->iov[k].iov_len <= max; k++)
                len += op->iov[k].iov_len;
            for (uint64_t done = 0; done < len;) {
                uint64_t piece = len - done < max ? len - done : max;
                struct nbdio_cmd *cmd = nbdio_cmd_new(c, op, op->kind, off, piece, base + done);
                if (!cmd)
                    goto nomem;
                *link = cmd;
                link = &cmd->next;
                n++;
                off += piece;
                done += piece;
            }
            total += len;
        }
        if (total != op->length) {
            op->err = EINVAL;
            goto fail;
        }
    } else if (op->kind == NBDIO_FLUSH) {
        if (in->can_flush) {   /* without it the server has no cache to write back */
            if (!(first = nbdio_cmd_new(c, op, op->kind, 0, 0, NULL)))
                goto nomem;
            n = 1;
        }
    } else {
        if (!(op->kind == NBDIO_ZERO ? in->can_zero : in->can_trim)) {
            nbdio_op_end(c, op, EOPNOTSUPP);
            return;
        }
        for (uint64_t off = op->offset, end = op->offset + op->length; off < end;) {
            uint64_t piece = end - off < NBDIO_MAX_ZERO ? end - off : NBDIO_MAX_ZERO;
            struct nbdio_cmd *cmd = nbdio_cmd_new(c, op, op->kind, off, piece, NULL);
            if (!cmd)
                goto nomem;
            *link = cmd;
            link = &cmd->next;
            n++;
            off += piece;
        }
    }
    if (n == 0) {
        nbdio_op_end(c, op, 0);
        return;
    }
    op->cmds_left = n;
    while (first) {
        struct nbdio_cmd *cmd = first;
        first = cmd->next;
        cmd->seq = c->seq++;
        nbdio_issue(c, cmd);
    }
    return;
nomem:
    op->err = ENOMEM;
fail:
    while (first) {
        struct nbdio_cmd *cmd = first;
        first = cmd->next;
        free(cmd);
    }
    nbdio_op_end(c, op, 0);
}

static int nbdio_is_fence(const struct nbdio_op *op)
{
    return op->kind == NBDIO_FLUSH || op->kind == NBDIO_ZERO || op->kind == NBDIO_TRIM;
}

/* Issue waiting ops in order. A flush or discard waits until everything before it has
 * completed and runs alone (the engines' ordering contract, like IOSQE_IO_DRAIN): NBD's
 * flush covers only writes the server has already answered. drive_mu held. */
static void nbdio_pump(struct blkpy_nbd *c)
{
    while (c->wait_head && c->state == NBDIO_UP && !c->fence && !c->n_retry) {
        struct nbdio_op *op = c->wait_head;
        int fence = nbdio_is_fence(op);
        if (fence && c->in_flight)
            return;
        c->wait_head = op->next;
        if (!c->wait_head)
            c->wait_tail = NULL;
        if (fence)
            c->fence = op;
        nbdio_start(c, op);
    }
}

/* Move what submitters queued behind what waits already. */
static void nbdio_take_incoming(struct blkpy_nbd *c)
{
    pthread_mutex_lock(&c->mu);
    struct nbdio_op *head = c->in_head, *tail = c->in_tail;
    c->in_head = c->in_tail = NULL;
    pthread_mutex_unlock(&c->mu);
    if (!head)
        return;
    if (c->wait_tail)
        c->wait_tail->next = head;
    else
        c->wait_head = head;
    c->wait_tail = tail;
}

static int nbdio_retryable(int err)
{
    /* ENOTCONN: libnbd aborted the command with the connection; ESHUTDOWN: the server
     * is going away and refused it. Neither says anything about the data. */
    return err == ENOTCONN || err == ESHUTDOWN;
}

/* Account what libnbd finished, then issue what can go (drive_mu held). */
static void nbdio_account(struct blkpy_nbd *c)
{
again:
    pthread_mutex_lock(&c->done_mu);
    struct nbdio_cmd *list = c->done;
    c->done = NULL;
    pthread_mutex_unlock(&c->done_mu);
    if (list)
        c->progress_ms = nbdio_now_ms();
    while (list) {
        struct nbdio_cmd *cmd = list;
        list = cmd->next;
        c->in_flight--;
        if (nbdio_retryable(cmd->err) && c->reconnect_ms > 0 &&
            !__atomic_load_n(&c->stop, __ATOMIC_RELAXED) && c->state != NBDIO_EXPIRED &&
            cmd->attempts < NBDIO_MAX_ATTEMPTS) {
            cmd->next = c->retry;
            c->retry = cmd;
            c->n_retry++;
            continue;
        }
        nbdio_cmd_end(c, cmd, cmd->err);
    }
    nbdio_pump(c);
    if (__atomic_load_n(&c->done, __ATOMIC_RELAXED))   /* an issue that failed at once */
        goto again;
}

/* The connection thread is needed: a send the socket did not take at once (it polls for
 * POLLOUT), a dead connection, commands to retry. drive_mu held. */
static int nbdio_needs_thread(struct blkpy_nbd *c)
{
    if (c->state != NBDIO_UP || !c->h)
        return 0;
    if (c->n_retry || __atomic_load_n(&c->drop, __ATOMIC_RELAXED))
        return 1;
    struct nbd_handle *h = c->h;
    return (L(nbd_aio_get_direction)(h) & LIBNBD_AIO_DIRECTION_WRITE) ||
           L(nbd_aio_is_dead)(h) == 1 || L(nbd_aio_is_closed)(h) == 1;
}

/* Let go of drive_mu, everything accounted, waking the connection thread if needed. */
static void nbdio_drive_unlock(struct blkpy_nbd *c)
{
    if (c->state == NBDIO_UP)   /* what submitters queued (the caller, or one that found it held) */
        nbdio_take_incoming(c);
    nbdio_account(c);
    int kick = nbdio_needs_thread(c);
    pthread_mutex_unlock(&c->drive_mu);
    if (kick)
        nbdio_signal(c->kick_fd);
}

static int nbdio_by_seq(const void *a, const void *b)
{
    uint64_t x = (*(struct nbdio_cmd *const *)a)->seq, y = (*(struct nbdio_cmd *const *)b)->seq;
    return x < y ? -1 : x > y;
}

/* Re-issue what the old connection lost, in its original order (state UP). */
static void nbdio_reissue(struct blkpy_nbd *c)
{
    struct nbdio_cmd *list = c->retry;
    uint32_t n = c->n_retry;
    c->retry = NULL;
    c->n_retry = 0;
    __atomic_fetch_add(&c->stats.retried, n, __ATOMIC_RELAXED);
    struct nbdio_cmd **v = n ? malloc(n * sizeof *v) : NULL;
    if (!v) {   /* nothing to do, or no memory to sort: issue rather than lose them */
        while (list) {
            struct nbdio_cmd *next = list->next;
            nbdio_issue(c, list);
            list = next;
        }
        return;
    }
    uint32_t k = 0;
    for (; list && k < n; list = list->next)
        v[k++] = list;
    qsort(v, k, sizeof *v, nbdio_by_seq);
    for (uint32_t i = 0; i < k; i++)
        nbdio_issue(c, v[i]);
    free(v);
}

/* The reconnect delay ran out: every waiting request fails, and new ones fail at once
 * until the server is back. */
static void nbdio_expire(struct blkpy_nbd *c)
{
    pthread_mutex_lock(&c->mu);
    c->state = NBDIO_EXPIRED;
    c->stats.expired++;
    pthread_mutex_unlock(&c->mu);
    nbdio_take_incoming(c);   /* queued before submitters could see the new state */
    while (c->retry) {
        struct nbdio_cmd *cmd = c->retry;
        c->retry = cmd->next;
        nbdio_cmd_end(c, cmd, EIO);
    }
    c->n_retry = 0;
    while (c->wait_head) {
        struct nbdio_op *op = c->wait_head;
        c->wait_head = op->next;
        nbdio_op_end(c, op, EIO);
    }
    c->wait_tail = NULL;
}

/* ---- the connection thread --------------------------------------------------------- */

/* drive_mu held. */
static void nbdio_lost(struct blkpy_nbd *c)
{
    /* Down first, so that accounting issues nothing new on the dead handle. */
    pthread_mutex_lock(&c->mu);
    c->state = NBDIO_DOWN;
    pthread_mutex_unlock(&c->mu);
    c->down_since_ms = nbdio_now_ms();
    nbdio_account(c);   /* the aborted commands go to the retry list */
    struct nbd_handle *old = c->h;
    c->h = NULL;
    if (c->reconnect_ms <= 0 || nbdio_giving_up(c))
        nbdio_expire(c);
    int fd = L(nbd_aio_get_fd)(old);
    if (fd >= 0)
        epoll_ctl(c->sock_ep, EPOLL_CTL_DEL, fd, NULL);
    L(nbd_close)(old);
}

static void nbdio_wait_kick(struct blkpy_nbd *c, int ms)
{
    struct pollfd p = {c->kick_fd, POLLIN, 0};
    if (poll(&p, 1, ms) > 0)
        nbdio_drain_fd(c->kick_fd);
}

/* Ring loops' epoll sets hold sock_ep, which holds the current socket. A socket it cannot
 * hold (no fd, or epoll out of memory or of max_user_watches) is a failed connection: a
 * loop that never wakes for its replies would leave the guest's requests unanswered. 0, or
 * -1 with the reason in msg. */
static int nbdio_watch_socket(struct blkpy_nbd *c, struct nbd_handle *h, char *msg,
                              uint32_t msglen)
{
    struct epoll_event ev = {.events = EPOLLIN};
    int fd = L(nbd_aio_get_fd)(h);
    if (fd < 0) {
        nbdio_error(msg, msglen);
        return -1;
    }
    if (epoll_ctl(c->sock_ep, EPOLL_CTL_ADD, fd, &ev)) {
        snprintf(msg, msglen, "cannot watch the NBD socket: epoll_ctl: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static void nbdio_reconnect(struct blkpy_nbd *c)
{
    int backoff = NBDIO_BACKOFF_MIN_MS;
    char msg[256];
    while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
        /* (before an attempt too: one to an unanswering host takes connect_ms) */
        if (c->state == NBDIO_DOWN && nbdio_giving_up(c)) {
            pthread_mutex_lock(&c->drive_mu);
            nbdio_expire(c);
            nbdio_drive_unlock(c);
        }
        struct nbd_handle *h = nbdio_connect(c->uri, c->connect_ms, &c->stop, msg,
                                             sizeof msg);
        if (h && nbdio_watch_socket(c, h, msg, sizeof msg)) {
            L(nbd_close)(h);   /* (then as any failed attempt: back off, or give up) */
            h = NULL;
        }
        if (h) {
            pthread_mutex_lock(&c->drive_mu);
            c->h = h;
            pthread_mutex_lock(&c->mu);
            nbdio_fill_info(h, &c->info);
            c->state = NBDIO_UP;
            c->stats.reconnects++;
            pthread_mutex_unlock(&c->mu);
            nbdio_reissue(c);
            nbdio_take_incoming(c);
            nbdio_pump(c);
            nbdio_drive_unlock(c);
            return;
        }
        if (c->state == NBDIO_DOWN && (nbdio_giving_up(c) ||
                                       nbdio_now_ms() - c->down_since_ms >= c->reconnect_ms)) {
            pthread_mutex_lock(&c->drive_mu);
            nbdio_expire(c);
            nbdio_drive_unlock(c);
        }
        nbdio_wait_kick(c, backoff);
        backoff = backoff * 2 < NBDIO_BACKOFF_MAX_MS ? backoff * 2 : NBDIO_BACKOFF_MAX_MS;
    }
}

static void *nbdio_thread(void *arg)
{
    struct blkpy_nbd *c = arg;
    while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
        if (c->state != NBDIO_UP) {   /* (only this thread sets it UP) */
            nbdio_reconnect(c);
            continue;
        }
        pthread_mutex_lock(&c->drive_mu);
        struct nbd_handle *h = c->h;   /* only this thread replaces it */
        if (__atomic_exchange_n(&c->drop, 0, __ATOMIC_ACQ_REL) ||
            (c->n_retry && L(nbd_aio_is_ready)(h) == 1)) {
            /* Make libnbd see a dead socket, so every command in flight comes back
             * through the usual abort path and is retried on the next connection. */
            int fd = L(nbd_aio_get_fd)(h);
            if (fd >= 0)
                shutdown(fd, SHUT_RDWR);
        }
        if (L(nbd_aio_is_dead)(h) == 1 || L(nbd_aio_is_closed)(h) == 1 ||
            L(nbd_aio_get_fd)(h) < 0) {
            nbdio_lost(c);
            nbdio_drive_unlock(c);
            continue;
        }
        /* Submitters wake us only while we sleep and they cannot issue themselves (a
         * kick costs the submitting thread a wake-up of this one): nothing queued before
         * we say so may be left behind. */
        pthread_mutex_lock(&c->mu);
        int more = c->in_head != NULL;
        c->idle = !more;
        pthread_mutex_unlock(&c->mu);
        /* While a ring loop watches, replies are its to read: only a send the socket
         * did not take at once is ours. */
        short events = nbdio_events(h);
        if (__atomic_load_n(&c->watchers, __ATOMIC_ACQUIRE) > 0)
            events &= POLLOUT;
        struct pollfd p[2] = {{events ? L(nbd_aio_get_fd)(h) : -1, events, 0},
                              {c->kick_fd, POLLIN, 0}};
        /* Other threads issue commands without waking us: with none in flight, look
         * again after the stall time anyway (a stall is then seen within twice it). */
        int64_t stall_ms = nbdio_stall_ms(c), left = stall_ms;
        if (c->in_flight && stall_ms > 0)
            left = c->progress_ms + stall_ms - nbdio_now_ms();
        int timeout = more ? 0 : stall_ms <= 0 ? -1 : left <= 0 ? 0
                    : left > 1000000 ? 1000000 : (int)left;
        pthread_mutex_unlock(&c->drive_mu);
        int n = poll(p, 2, timeout);
        int poll_err = n < 0 ? errno : 0;
        pthread_mutex_lock(&c->drive_mu);
        if (n == 0 && c->in_flight && stall_ms > 0 &&
            nbdio_now_ms() - c->progress_ms >= stall_ms) {
            /* The server holds requests without answering (stopped, or a network that
             * drops packets without a reset): treat it as a lost connection, so they
             * are retried on a new one, or fail once the reconnect delay runs out. */
            __atomic_fetch_add(&c->stats.stalls, 1, __ATOMIC_RELAXED);
            __atomic_store_n(&c->drop, 1, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&c->drive_mu);
            continue;
        }
        if (n > 0 && (p[1].revents & POLLIN))
            nbdio_drain_fd(c->kick_fd);
        if (n > 0 && p[0].revents)
            nbdio_notify_ready(h, p[0].fd, nbdio_events(h));
        pthread_mutex_lock(&c->mu);
        c->idle = 0;
        pthread_mutex_unlock(&c->mu);
        nbdio_take_incoming(c);
        nbdio_account(c);
        pthread_mutex_unlock(&c->drive_mu);
        if (n < 0 && poll_err != EINTR)
            nbdio_wait_kick(c, 10);
    }
    return NULL;
}

/* ---- the API -------------------------------------------------------------------------- */

struct blkpy_nbd *blkpy_nbd_open(const char *uri, int readonly, int64_t connect_ms,
                                 int64_t reconnect_ms, int64_t stall_ms, char *msg,
                                 uint32_t msglen)
{
    if (!blkpy_nbd_available(msg, msglen))
        return NULL;
    struct blkpy_nbd *c = calloc(1, sizeof *c);
    if (!c || !(c->uri = strdup(uri))) {
        free(c);
        snprintf(msg, msglen, "out of memory");
        return NULL;
    }
    c->readonly = readonly;
    c->connect_ms = connect_ms;
    c->reconnect_ms = reconnect_ms;
    c->stall_ms = stall_ms;
    pthread_mutex_init(&c->drive_mu, NULL);
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->done_mu, NULL);
    c->sock_ep = -1;
    c->kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->kick_fd < 0) {
        snprintf(msg, msglen, "eventfd: %s", strerror(errno));
        goto fail;
    }
    c->sock_ep = epoll_create1(EPOLL_CLOEXEC);
    if (c->sock_ep < 0) {
        snprintf(msg, msglen, "epoll_create1: %s", strerror(errno));
        goto fail;
    }
    c->h = nbdio_connect(uri, connect_ms, NULL, msg, msglen);
    if (!c->h)
        goto fail;
    nbdio_fill_info(c->h, &c->info);
    if (nbdio_watch_socket(c, c->h, msg, msglen)) {
        L(nbd_close)(c->h);
        goto fail;
    }
    int err = pthread_create(&c->thread, NULL, nbdio_thread, c);
    if (err) {
        snprintf(msg, msglen, "pthread_create: %s", strerror(err));
        L(nbd_close)(c->h);
        goto fail;
    }
    c->thread_started = 1;
    return c;
fail:
    if (c->kick_fd >= 0)
        close(c->kick_fd);
    if (c->sock_ep >= 0)
        close(c->sock_ep);
    free(c->uri);
    free(c);
    return NULL;
}

void blkpy_nbd_get_info(struct blkpy_nbd *c, struct blkpy_nbd_info *info)
{
    pthread_mutex_lock(&c->mu);
    *info = c->info;
    pthread_mutex_unlock(&c->mu);
}

void blkpy_nbd_get_stats(struct blkpy_nbd *c, struct blkpy_nbd_stats *stats)
{
    pthread_mutex_lock(&c->mu);
    stats->reconnects = c->stats.reconnects;
    stats->expired = c->stats.expired;
    stats->state = c->state;
    pthread_mutex_unlock(&c->mu);
    stats->commands = __atomic_load_n(&c->stats.commands, __ATOMIC_RELAXED);
    stats->retried = __atomic_load_n(&c->stats.retried, __ATOMIC_RELAXED);
    stats->stalls = __atomic_load_n(&c->stats.stalls, __ATOMIC_RELAXED);
    stats->last_errno = __atomic_load_n(&c->stats.last_errno, __ATOMIC_RELAXED);
}

void blkpy_nbd_drop(struct blkpy_nbd *c)
{
    __atomic_store_n(&c->drop, 1, __ATOMIC_RELEASE);
    nbdio_signal(c->kick_fd);
}

void blkpy_nbd_give_up(struct blkpy_nbd *c)
{
    __atomic_store_n(&c->give_up, 1, __ATOMIC_RELEASE);
    nbdio_signal(c->kick_fd);
}

void blkpy_nbd_close(struct blkpy_nbd *c)
{
    __atomic_store_n(&c->stop, 1, __ATOMIC_RELEASE);
    nbdio_signal(c->kick_fd);
    pthread_join(c->thread, NULL);
    struct nbd_handle *h = c->h;
    if (h && L(nbd_aio_disconnect)(h, 0) == 0) {
        /* A clean NBD_CMD_DISC, so the server ends the session as it should; bounded
         * because a server that stopped answering must not hold up our exit. */
        int64_t deadline = nbdio_now_ms() + NBDIO_DISCONNECT_MS;
        while (L(nbd_aio_is_closed)(h) != 1 && L(nbd_aio_is_dead)(h) != 1) {
            int64_t left = deadline - nbdio_now_ms();
            struct pollfd p = {L(nbd_aio_get_fd)(h), nbdio_events(h), 0};
            if (left <= 0 || p.fd < 0 || poll(&p, 1, (int)left) <= 0 ||
                nbdio_notify(h, p.revents) == -1)
                break;
        }
    }
    if (h)
        L(nbd_close)(h);
    /* Nothing should be left (queues are freed first); never leak what is. */
    nbdio_take_incoming(c);
    while (c->wait_head) {
        struct nbdio_op *op = c->wait_head;
        c->wait_head = op->next;
        free(op);
    }
    while (c->retry) {
        struct nbdio_cmd *cmd = c->retry;
        c->retry = cmd->next;
        free(cmd);
    }
    close(c->kick_fd);
    close(c->sock_ep);
    pthread_mutex_destroy(&c->drive_mu);
    pthread_mutex_destroy(&c->mu);
    pthread_mutex_destroy(&c->done_mu);
    free(c->uri);
    free(c);
}

static int nbdio_submit(struct blkpy_disk_queue *dq, const struct blkpy_queue_op *ops,
                        uint32_t n)
{
    struct blkpy_nbd_queue *q = (struct blkpy_nbd_queue *)dq;
    struct blkpy_nbd *c = q->c;
    struct nbdio_op *first = NULL, **link = &first;
    for (uint32_t k = 0; k < n; k++) {
        struct nbdio_op *op = calloc(1, sizeof *op);
        if (!op) {
            while (first) {
                struct nbdio_op *next = first->next;
                free(first);
                first = next;
            }
            return -ENOMEM;
        }
        op->q = q;
        op->done.user_data = ops[k].user_data;
        op->kind = ops[k].kind;
        op->offset = ops[k].offset;
        op->length = ops[k].length;
        op->iov = (const struct iovec *)(uintptr_t)ops[k].iov_addr;
        op->iovcnt = ops[k].iov_count;
        *link = op;
        link = &op->next;
    }
    /* Issued here if no other thread drives the handle (libnbd sends at once, nothing
     * blocks), else by whoever does: a submitter never waits for the handle, nor for a
     * send the socket does not take at once (the connection thread finishes it). */
    int kick = 0;
    pthread_mutex_lock(&c->mu);
    while (first) {
        struct nbdio_op *op = first;
        first = op->next;
        op->next = NULL;
        if (op->kind > NBDIO_TRIM || c->state == NBDIO_EXPIRED) {
            op->err = op->kind > NBDIO_TRIM ? EINVAL : EIO;
            nbdio_post(op);
        } else {
            if (c->in_tail)
                c->in_tail->next = op;
            else
                c->in_head = op;
            c->in_tail = op;
            kick = c->idle;
        }
    }
    pthread_mutex_unlock(&c->mu);
    if (pthread_mutex_trylock(&c->drive_mu) == 0) {
        /* (it takes them in and issues them; reconnecting, it leaves them to the thread) */
        nbdio_drive_unlock(c);
    } else if (kick) {   /* the holder may be the thread, about to sleep */
        nbdio_signal(c->kick_fd);
    }
    return 0;
}

/* A watching ring loop: the socket is readable (or it waits for completions). */
static void nbdio_drive(struct blkpy_disk_queue *dq)
{
    struct blkpy_nbd *c = ((struct blkpy_nbd_queue *)dq)->c;
    pthread_mutex_lock(&c->drive_mu);
    if (c->state == NBDIO_UP && c->h &&
        (L(nbd_aio_get_direction)(c->h) & LIBNBD_AIO_DIRECTION_READ))
        nbdio_notify_ready(c->h, L(nbd_aio_get_fd)(c->h), POLLIN);
    nbdio_drive_unlock(c);
}

static void nbdio_watch(struct blkpy_disk_queue *dq, int on)
{
    struct blkpy_nbd *c = ((struct blkpy_nbd_queue *)dq)->c;
    /* The last one gone: the thread must poll the socket again. */
    if (__atomic_add_fetch(&c->watchers, on ? 1 : -1, __ATOMIC_ACQ_REL) == 0)
        nbdio_signal(c->kick_fd);
}

struct blkpy_disk_queue *blkpy_nbd_queue_new(struct blkpy_nbd *c)
{
    struct blkpy_nbd_queue *q = (struct blkpy_nbd_queue *)blkpy_queue_new(
        sizeof(struct blkpy_nbd_queue), nbdio_submit, NULL);
    if (!q)
        return NULL;
    q->c = c;
    q->dq.drive_fd = c->sock_ep;
    q->dq.drive = nbdio_drive;
    q->dq.watch = nbdio_watch;
    return &q->dq;
}

#endif /* BLKPY_HAVE_LIBNBD */
