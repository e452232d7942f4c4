/* The process heap faulted in ahead of a takeover: under emulation (the lab's PV dom0)
 * each fresh page costs ~0.2 ms to fault in, and a takeover's allocations (an image's
 * tables, numpy's temporaries, the ring loop's buffers) fault hundreds. */
#ifndef BLKPY_HEAP_H
#define BLKPY_HEAP_H
#include <stddef.h>

/* CDEF-BEGIN */
/* Serve allocations of up to `bytes` from the heap, keep what is freed there, and fault
 * in `bytes` of it now. 0 or -errno. */
int blkpy_heap_prefault(size_t bytes);
/* The takeover is over: give back what the heap holds free beyond glibc's usual margin
 * (allocations up to `bytes` still come from the heap). */
void blkpy_heap_settle(size_t bytes);
/* CDEF-END */
#endif
