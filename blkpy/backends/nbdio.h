/* blkpy's NBD client core: one libnbd connection per disk, driven by its own thread, which
 * takes the guest's reads and writes as address ranges of the mapped pages (no copy),
 * keeps flushes and discards ordered after everything submitted before them, and retries
 * what was in flight when the connection dropped once it is back.
 *
 * libnbd is opened with dlopen on first use: the native module then neither needs libnbd
 * to load nor its headers to build (without <libnbd.h> every call reports ENOSYS). */
#ifndef BLKPY_NBDIO_H
#define BLKPY_NBDIO_H
#include <stdint.h>
#include "diskq.h"

/* CDEF-BEGIN */
struct blkpy_nbd;
struct blkpy_disk_queue;

/* What the export offers, as negotiated on the current connection. */
struct blkpy_nbd_info {
    uint64_t size;
    int32_t read_only;
    int32_t can_flush;
    int32_t can_trim;
    int32_t can_zero;
    int32_t can_multi_conn;
    int32_t structured_replies;
    int32_t tls;
    uint32_t block_min;
    uint32_t block_preferred;
    uint32_t block_max;
};

/* Counters; `state` is 0 connected, 1 reconnecting (requests wait), 2 reconnecting past
 * the reconnect delay (requests fail at once). */
struct blkpy_nbd_stats {
    uint64_t commands;
    uint64_t reconnects;
    uint64_t retried;
    uint64_t expired;
    uint64_t stalls;      /* connections dropped because the server stopped answering */
    int32_t state;
    int32_t last_errno;
};

/* 1 if libnbd can be used; otherwise 0 and why in msg. */
int blkpy_nbd_available(char *msg, uint32_t msglen);
/* Connect to `uri` (libnbd's URI syntax) within connect_ms; NULL and a message on
 * failure. Requests that find the connection gone wait up to reconnect_ms for it; a
 * connection with requests in flight and no reply for stall_ms (0: never) is dropped
 * and they are retried on the next. */
struct blkpy_nbd *blkpy_nbd_open(const char *uri, int readonly, int64_t connect_ms,
                                 int64_t reconnect_ms, int64_t stall_ms, char *msg,
                                 uint32_t msglen);
void blkpy_nbd_get_info(struct blkpy_nbd *c, struct blkpy_nbd_info *info);
void blkpy_nbd_get_stats(struct blkpy_nbd *c, struct blkpy_nbd_stats *stats);
/* Drop the current connection as if the network had (tests); it reconnects. */
void blkpy_nbd_drop(struct blkpy_nbd *c);
/* The process is going away (SIGTERM): stop waiting for the server. What waits for a
 * lost connection fails now rather than after the reconnect delay, and a connection
 * holding requests without a reply is dropped after 2 s rather than the request
 * timeout; a live connection's requests complete as usual. */
void blkpy_nbd_give_up(struct blkpy_nbd *c);
/* Stop the thread and disconnect. Every queue must be freed first. */
void blkpy_nbd_close(struct blkpy_nbd *c);

/* A completion queue of its own on the connection (diskq.h); NULL if out of memory. */
struct blkpy_disk_queue *blkpy_nbd_queue_new(struct blkpy_nbd *c);
/* CDEF-END */
#endif
