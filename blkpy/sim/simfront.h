/* The simulated blkfront's load generator for benchmarks: keeps a fixed number of READ or
 * WRITE requests in flight on a blkif front ring, checking every response the way blkfront
 * does, so the generator costs far less CPU than the backend it measures.
 *
 * Python prepares one complete request slot per request id (operation, segments,
 * persistent grant refs, indirect pages) and owns the event channel: simfront_step() fills
 * slots, pushes, polls for responses, and returns when the backend must be notified or when
 * there is nothing to do but sleep until an event.
 *
 * Completion latency (push to the guest seeing the response, CLOCK_MONOTONIC) goes into a
 * log-linear histogram of nanoseconds: exact below 128 ns, then 64 bins per power of two, so
 * a bin is at most 1/64 of its lower bound wide (its midpoint is within 0.8% of any value
 * in it). 2048 bins reach 2^37 ns (137 s); anything longer lands in the last bin.
 */
#ifndef BLKPY_SIMFRONT_H
#define BLKPY_SIMFRONT_H
#include <stdint.h>

/* CDEF-BEGIN */
#define SIMFRONT_NOTIFY 1   /* requests were pushed and ring.h says: kick the backend */
#define SIMFRONT_WAIT 2     /* everything is in flight; rsp_event is armed: sleep */
#define SIMFRONT_DONE 4     /* the limit was reached and every request completed */
#define SIMFRONT_BROKEN 8   /* the backend broke the protocol (see bad_responses) */
#define SIMFRONT_HIST_BINS 2048 /* latency histogram size (see above) */

struct simfront {
    uint8_t *ring;              /* shared ring: 64-byte header, then slots */
    const uint8_t *templates;   /* depth * entry_size bytes: a ready request per id */
    uint32_t *free_ids;         /* stack of size entries (scratch) */
    uint8_t *pending;           /* size entries (scratch): id is in flight */
    uint32_t size;              /* ring slots (power of two) */
    uint32_t entry_size;        /* slot bytes of the ABI */
    uint32_t id_off;            /* offset of `id` in a request slot */
    uint32_t sector_off;        /* offset of `sector_number` */
    uint32_t depth;             /* requests kept in flight (<= size) */
    uint8_t response_op;        /* operation every response must carry (the templates') */
    uint8_t random;             /* 1: random slots, 0: sequential */
    uint8_t _pad[2];
    uint64_t sectors_per_req;   /* 512-byte sectors per request */
    uint64_t step_sectors;      /* request start sectors are multiples of this (0: the
                                 * request size; larger strides skip ahead, e.g. one write
                                 * per qcow2 cluster) */
    uint64_t slots_in_disk;     /* start positions in the disk range */
    uint64_t next_slot;         /* sequential position (where to start, then where it is) */
    uint64_t rng;               /* xorshift64 state, non-zero */
    uint64_t limit;             /* stop submitting after this many (0: no limit) */
    /* private ring indices and counters */
    uint32_t req_prod_pvt;
    uint32_t rsp_cons;
    uint32_t n_free;
    uint32_t in_flight;
    uint64_t submitted;
    uint64_t completed;
    uint64_t errors;            /* responses with a status other than OKAY */
    uint64_t bad_responses;     /* wrong id / not pending / wrong op / overflow */
    uint64_t pushes;
    uint64_t polls;             /* ring checks that found nothing */
    /* Transient grants (no feature-persistent): each request's grant entries are made
     * valid at submission and revoked at completion, as blkfront does with
     * gnttab_grant_foreign_access_ref / gnttab_end_foreign_access_ref. */
    uint8_t *grant_table;       /* the guest's v1 grant table (8-byte entries), or NULL */
    const uint32_t *id_grefs;   /* depth * grefs_per_id refs: every page of a request */
    uint32_t grefs_per_id;
    uint32_t _pad2;
    uint64_t grants_ended;
    uint64_t still_mapped;      /* revocations refused: the backend kept a mapping */
    /* Latency: NULL lat_hist records nothing. */
    uint64_t *submit_ns;        /* size entries (scratch): when each id was pushed */
    uint64_t *lat_hist;         /* SIMFRONT_HIST_BINS counters (not reset by init) */
};

/* Resets indices and counters (the ring header must already be initialised). */
void simfront_init(struct simfront *f);
/* Does as much work as possible without sleeping, polling the ring for up to poll_ns
 * nanoseconds when nothing is ready; returns SIMFRONT_* flags. */
int simfront_step(struct simfront *f, uint64_t poll_ns);
/* The histogram bin of a latency, and the smallest latency of a bin. */
uint32_t simfront_hist_index(uint64_t ns);
uint64_t simfront_hist_lower(uint32_t index);
/* CDEF-END */

#endif
