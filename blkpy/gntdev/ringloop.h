/* The ring loop's common case in C: one back ring served without the interpreter.
 *
 * Python (blkpy/vbd.py) owns the device, the grants and every decision that is not routine;
 * this loop copies request slots, gives each the same first-stage verdict as
 * blkpy/requests.py's numpy validator, serves valid READ/WRITE/FLUSH/BARRIER requests and
 * indirect READ/WRITE requests whose pages (indirect pages included) are all persistent
 * grants with preadv/pwritev/fdatasync on a raw file, writes the
 * responses, notifies by the ring's rules, polls for a bounded and adaptive time, and sleeps
 * on the event channel. Anything else (a refused request, a discard, a grant not in
 * the cache, an image that is not a plain file) stops the loop at that request, before
 * anything of it is done, and Python takes over from there with the reference path.
 */
#ifndef BLKPY_RINGLOOP_H
#define BLKPY_RINGLOOP_H
#include <stdint.h>

/* CDEF-BEGIN */
/* A network disk's queue (blkpy/backends/diskq.h: NBD, Ceph RBD): with one, the loop
 * serves the disk's reads, writes and flushes asynchronously through it, like io_uring. */
struct blkpy_disk_queue;
/* Segments of an indirect request the loop serves itself (preadv takes 1024 iovecs);
 * longer ones go to Python, which refuses what it cannot do. */
#define BLKPY_RL_MAX_INDIRECT_SEGS 1024
/* Per-disk I/O limits with QEMU's throttling semantics (a leaky bucket per limit: the
 * average rate, and optionally a burst rate allowed for max_length seconds). Buckets:
 * BLKPY_QOS_IOPS_TOTAL/READ/WRITE, BLKPY_QOS_BPS_TOTAL/READ/WRITE. The queues of a disk
 * share one; its spin lock makes admission atomic across their threads. */
#define BLKPY_QOS_IOPS_TOTAL 0
#define BLKPY_QOS_IOPS_READ 1
#define BLKPY_QOS_IOPS_WRITE 2
#define BLKPY_QOS_BPS_TOTAL 3
#define BLKPY_QOS_BPS_READ 4
#define BLKPY_QOS_BPS_WRITE 5
#define BLKPY_QOS_BUCKETS 6
struct blkpy_qos_bucket {
    double avg;              /* units per second; 0: no limit */
    double max;              /* burst rate; 0: no burst beyond a tenth of a second of avg */
    double max_length;       /* seconds the burst rate may be kept up (>= 1) */
    double level, burst_level;
};
struct blkpy_qos {
    struct blkpy_qos_bucket b[BLKPY_QOS_BUCKETS];
    int64_t last_ns;
    int32_t lock;
    uint32_t active;         /* some limit is set */
    uint64_t delays;         /* requests that had to wait */
};
/* 0: a request moving `bytes` (a write if `write`) is admitted and charged; otherwise the
 * ns to wait before asking again (nothing charged). */
int64_t blkpy_qos_admit(struct blkpy_qos *q, int write, uint64_t bytes);

/* What a successor process needs to take a ring over after this one dies (a shared,
 * file-backed mapping: it outlives the process): the private indices, and a copy of
 * every request consumed but not answered, in one of `size` entries (at most `size`
 * requests are owed an answer; their ring indices may span more than the ring, since
 * answers go out in completion order, so entries are taken from the free ones, starting
 * at `cursor`, not by index). Ordering (program order is
 * enough: a killed process's stores are all in the file): a request is recorded, then
 * req_cons moves past it, then its I/O starts; an answer first records the response
 * position it takes (rsp_pos = position + 1), then writes the response slot, then moves
 * rsp_prod_pvt past it, then clears the entry. An entry whose rsp_pos lies below
 * rsp_prod_pvt was answered; any other live entry is replayed exactly once. */
#define BLKPY_JOURNAL_MAGIC 0x4a4b4c42u
#define BLKPY_JOURNAL_SLOT 112
struct blkpy_journal_entry {
    uint32_t live;           /* 1: consumed, not yet answered */
    uint32_t rsp_pos;        /* response position + 1, once the answer is being written */
    uint32_t index;          /* the request's ring index (free-running) */
    uint32_t _pad;
    uint8_t slot[BLKPY_JOURNAL_SLOT];
};
struct blkpy_ring_journal {
    uint32_t magic, size, entry_size, generation;
    uint32_t req_cons, rsp_prod_pvt;
    uint32_t cursor;         /* where the search for a free entry starts */
    uint32_t _pad[9];
    struct blkpy_journal_entry e[];
};

/* The private end of a back ring; Python's BackRing and the loop share one. */
struct blkpy_back_ring {
    uint8_t *sring;          /* the mapped shared ring (64-byte header, then the slots) */
    uint32_t size;           /* slots, a power of two */
    uint32_t entry_size;
    uint32_t req_cons;
    uint32_t rsp_prod_pvt;
    struct blkpy_ring_journal *journal;   /* NULL: nothing survives this process */
};
/* Record the copied request s, which takes ring index req_cons, as consumed; returns its
 * entry (-1 without a journal). */
int32_t blkpy_journal_consume(struct blkpy_back_ring *r, const uint8_t *s);
/* Record the answer to the request in `entry` about to be written at rsp_prod_pvt (call
 * before writing the slot), then (after) that it is written. entry -1: no journal. */
void blkpy_journal_answer(struct blkpy_back_ring *r, int32_t entry);
void blkpy_journal_answered(struct blkpy_back_ring *r, int32_t entry);
/* Test hook: BLKPY_CRASH_AT=<point>:<n> kills the process at the n-th pass of a point
 * (consume, submit, io-done, produced, pushed). */
void blkpy_crash_point(int point);

/* Where the fields of a request slot sit for one guest ABI (blkif.md section 3). */
struct blkpy_slot_layout {
    uint32_t entry_size;
    uint32_t id_off;
    uint32_t sector_off;
    uint32_t seg_off;        /* first inline segment; a discard's nr_sectors */
};

/* What validation knows of the disk and the negotiated features (requests.DiskGeometry). */
struct blkpy_geometry {
    uint64_t sectors;        /* 512-byte units */
    uint32_t sector_size;
    uint32_t max_indirect_segments;
    uint8_t readonly;
    uint8_t discard;
    uint8_t secure_discard;
    uint8_t flush;
    uint8_t barrier;
};

/* First-stage verdicts of n copied slots, identical to requests.validate_batch: reason
 * code (index into requests.REASONS, 0 = accepted so far), bytes moved, operation to echo,
 * effective operation. */
void blkpy_validate_slots(const uint8_t *slots, int n, const struct blkpy_slot_layout *abi,
                          const struct blkpy_geometry *g, int8_t *code, int64_t *nbytes,
                          uint8_t *rsp_op, int64_t *io_op);

/* A map from 64-bit keys to 64-bit values that Python fills and the loop reads without
 * locks: open addressing over a power-of-two table, never more than half full. keys hold
 * key + 1 (0: an empty slot); a value of 0 means "not known" (the caller asks Python), so
 * an entry is invalidated by zeroing its value and the probe chains stay intact.
 * Used for the persistent grants (gref -> page address) and for the extents of an image
 * format (guest cluster -> host offset | BLKPY_EXTENT_* flags). */
struct blkpy_table {
    uint64_t *keys;
    uint64_t *vals;
    uint32_t mask;
};
void blkpy_table_put(struct blkpy_table *t, uint64_t key, uint64_t val);
void blkpy_table_put_many(struct blkpy_table *t, const uint64_t *keys, const uint64_t *vals,
                          int n);
/* out[i] = value of keys[i], 0 where unknown. */
void blkpy_table_get(const struct blkpy_table *t, const uint64_t *keys, int n, uint64_t *out);
/* Zero the values of keys first .. first + count - 1. */
void blkpy_table_forget(struct blkpy_table *t, uint64_t first, uint64_t count);

#define BLKPY_EXTENT_READ 1     /* the guest cluster reads as host data at the offset */
#define BLKPY_EXTENT_WRITE 2    /* ... and may be rewritten there in place */
#define BLKPY_EXTENT_FLAGS 3

/* How the loop reaches the event channel without Python. */
#define BLKPY_EVTCHN_PYTHON 0   /* only Python can: the loop hands notify/sleep back */
#define BLKPY_EVTCHN_LINUX 1    /* /dev/xen/evtchn fd: ioctl notify, read+write ack */
#define BLKPY_EVTCHN_SIM 2      /* sim datagram socket and shared port table */
struct blkpy_evtchn {
    int kind;
    int fd;
    uint32_t local_port;
    unsigned long notify_ioctl;      /* linux: IOCTL_EVTCHN_NOTIFY */
    const uint64_t *port_entry;      /* sim: this port's entry in the shared table */
    char name_prefix[120];           /* sim: peer socket name up to "dom" (abstract, no NUL) */
    uint32_t name_prefix_len;
};

/* Why blkpy_ringloop_run returned. */
#define BLKPY_LOOP_IDLE 0        /* ring empty, req_event armed (only when it may not sleep) */
#define BLKPY_LOOP_SLOW 1        /* the request at req_cons needs Python */
#define BLKPY_LOOP_WAKE 2        /* stop flag, wake_fd or io_fd: Python has work */
#define BLKPY_LOOP_OVERFLOW 3    /* the frontend's req_prod is impossible */
#define BLKPY_LOOP_EVTCHN 4      /* the event channel needs Python: its ack failed, or the
                                  * loop would sleep on a BLKPY_EVTCHN_PYTHON channel */
#define BLKPY_LOOP_NOTIFY 5      /* BLKPY_EVTCHN_PYTHON: Python must notify, then call again */
#define BLKPY_LOOP_EXTENT 6      /* the valid request at req_cons names clusters the extent
                                  * map does not hold (miss_*): the format may map them */
#define BLKPY_LOOP_IDLE_WORK 7   /* the ring is empty and Python asked (idle_work) for the
                                  * time between requests */

struct blkpy_rl_inflight;
struct blkpy_rl_scratch;
struct blkpy_uring;
struct iovec;
struct blkpy_ringloop {
    struct blkpy_back_ring *ring;
    struct blkpy_slot_layout abi;
    struct blkpy_geometry geom;
    struct blkpy_table *pgrants;     /* gref -> page; NULL: grants are not persistent */
    /* An image format's extents (qcow2): guest cluster -> host offset | flags; NULL for
     * raw images, where guest offset X is host offset X of disk_fd. Flushes go to Python
     * then (they write metadata back). */
    struct blkpy_table *extents;
    uint32_t cluster_bits;
    uint32_t _pad0;
    uint64_t extent_epoch;           /* odd while the loop uses extents it looked up */
    struct blkpy_evtchn evtchn;
    int disk_fd;                     /* raw image or device; -1: all requests go to Python */
    /* io_uring, answered as completions arrive. With async_all (O_DIRECT images) every
     * request goes there, so the guest's queue depth reaches the device; otherwise only the
     * reads of batches of at least async_reads_min requests (0: none), where one
     * io_uring_enter costs less than a preadv each, while single reads and buffered writes
     * (which io_uring punts to a worker) stay synchronous. NULL: all synchronous. */
    struct blkpy_uring *uring;
    struct blkpy_disk_queue *diskq;  /* instead of a uring: a network disk's queue */
    uint8_t async_all;
    uint8_t _pad1[3];
    uint32_t async_reads_min;
    uint32_t cur_batch;              /* requests in the batch being served */
    int uring_efd;                   /* the uring's completion eventfd */
    struct blkpy_rl_inflight *inflight;   /* set up by blkpy_ringloop_open */
    struct iovec *iov_pool;
    uint32_t *free_slots;
    uint32_t n_free, c_in_flight, iov_per_slot;
    int wake_fd;                     /* eventfd Python writes to get the loop back; -1 */
    int io_fd;                       /* Python's engine completion fd; -1 */
    int epoll_fd;                    /* set up by blkpy_ringloop_open */
    struct blkpy_rl_scratch *scratch;     /* set up by blkpy_ringloop_open */
    int stop;                        /* set by Python (any thread) to get the loop back */
    uint32_t py_in_flight;           /* batches in Python's engine: every request waits */
    uint32_t max_batch;              /* requests per batch before responses are pushed */
    int64_t poll_max_ns;             /* adaptive polling budget: upper bound (0: no polling) */
    int64_t poll_ns;                 /* the current budget */
    uint32_t notify_pending;         /* BLKPY_EVTCHN_PYTHON: Python must notify */
    /* counters (Python adds them to its own) */
    uint64_t rd_req, wr_req, f_req, ds_req, rd_sect, wr_sect, errors, batches, max_batch_seen;
    uint64_t notifies, wakeups, sleeps, polls_hit, polls_missed, io_errors;
    int32_t last_io_errno;
    /* Event-storm defence: event-channel wake-ups in a row that found no request, and
     * whether the last wake-up was an event not yet matched by a request. */
    uint32_t spurious_run;
    uint32_t woke_on_event;
    uint64_t spurious_wakeups, late_acks;
    uint64_t submits;                /* io_uring_enter calls that submitted requests */
    /* I/O limits shared by the disk's queues; NULL: none. charged: req_cons + 1 of a
     * request already admitted (it then went to Python, which must not charge it again) */
    /* Set once a sync of the disk failed (shared by the disk's queues and its Python
     * engine): the kernel may have dropped the pages it could not write, so no later
     * flush may claim durability (QEMU and PostgreSQL learned this the hard way). */
    int32_t *sync_lost;
    struct blkpy_qos *qos;
    uint32_t charged;
    uint32_t _pad2;
    int64_t qos_wait_ns;             /* how long the request at req_cons must still wait */
    uint64_t qos_delays_seen;        /* qos->delays when the loop last decided to poll */
    /* Python has work for when the ring is empty (set by Python, cleared by the loop) */
    uint32_t idle_work;
    uint32_t _pad3;
    /* BLKPY_LOOP_EXTENT: the guest byte range of the request and whether it writes */
    uint64_t miss_off, miss_len;
    uint32_t miss_write;
};
/* Creates the epoll set (evtchn fd, wake_fd, io_fd, uring_efd) and, with a uring, the
 * in-flight table; 0 or -errno. */
int blkpy_ringloop_open(struct blkpy_ringloop *l);
void blkpy_ringloop_close(struct blkpy_ringloop *l);
/* Serve until something needs Python (BLKPY_LOOP_*). With may_sleep 0 it returns IDLE
 * where it would sleep. Called without the GIL. */
int blkpy_ringloop_run(struct blkpy_ringloop *l, int may_sleep);
/* Wait until none of the n loops still uses an extent looked up before the call (its
 * epoch is even, or has moved on): after forgetting extents, before reusing their host
 * clusters. */
void blkpy_ringloop_quiesce(struct blkpy_ringloop *const *loops, int n);
/* Push produced responses and notify per the ring's rules (or set notify_pending). */
void blkpy_ringloop_push(struct blkpy_ringloop *l);
/* CDEF-END */
#endif
