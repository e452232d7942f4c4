#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

int blkpy_heap_prefault(size_t bytes)
{
    if (bytes > (size_t)16 << 20)
        return -EINVAL;   /* (glibc's largest mmap threshold is 32 MiB on 64-bit) */
    /* Below the threshold every allocation is the heap's (no fresh mmap per array), this
     * one's too; trimming off: the pages freed below stay faulted in for the takeover. */
    if (!mallopt(M_MMAP_THRESHOLD, (int)(bytes + 65536)) || !mallopt(M_TRIM_THRESHOLD, -1))
        return -EINVAL;
    unsigned char *p = malloc(bytes);
    if (!p)
        return -ENOMEM;
    /* One write per page is a fault per page; volatile: the compiler must not drop
     * stores to memory freed right after. */
    for (size_t off = 0; off < bytes; off += 4096)
        ((volatile unsigned char *)p)[off] = 0;
    free(p);
    return 0;
}

void blkpy_heap_settle(size_t bytes)
{
    /* glibc's own rule once a chunk of `bytes` was freed: trim above twice that (and
     * the mmap threshold stays where the prefault put it, as its dynamic one would) */
    mallopt(M_TRIM_THRESHOLD, (int)(2 * bytes));
    malloc_trim(0);
}
