/* blkpy's Ceph RBD data path in C: a disk's queues (diskq.h) over an image the Python side
 * opened through librbd (blkpy/backends/rbd.py), for the ring loop and the engine alike.
 * Reads and writes go to rbd_aio_readv/rbd_aio_writev on the guest pages' iovecs, flushes
 * to rbd_aio_flush, discards to rbd_aio_write_zeroes; each op's completion calls back
 * into C on a librbd thread, which posts it to the op's own queue, so queues sharing an
 * image never see each other's completions and no Python runs per request.
 *
 * librbd is opened with dlopen on first use (the Python side has it loaded already): the
 * native module neither needs librbd to load nor, without <rbd/librbd.h>, to build (then
 * blkpy_rbd_new says why and the disk serves through its synchronous calls). */
#ifndef BLKPY_RBDIO_H
#define BLKPY_RBDIO_H
#include <stdint.h>
#include "diskq.h"

/* CDEF-BEGIN */
struct blkpy_rbd;
struct blkpy_disk_queue;

/* The native side of an open image (an rbd_image_t, which the caller closes only after
 * blkpy_rbd_free). Writes and discards of a read-only one fail with EROFS before they
 * reach librbd; ops past `size` fail with EINVAL. NULL and why in msg on failure. The
 * image must not have an event notification set (rbd_set_image_notification): librbd
 * would then also queue these completions there, after they are released. */
struct blkpy_rbd *blkpy_rbd_new(void *image, int readonly, uint64_t size, char *msg,
                                uint32_t msglen);
/* The image was resized: later ops are checked against the new size. */
void blkpy_rbd_set_size(struct blkpy_rbd *r, uint64_t size);
/* Every queue must be freed first. */
void blkpy_rbd_free(struct blkpy_rbd *r);
/* A queue of its own on the image; NULL if out of memory. */
struct blkpy_disk_queue *blkpy_rbd_queue_new(struct blkpy_rbd *r);
/* CDEF-END */
#endif
