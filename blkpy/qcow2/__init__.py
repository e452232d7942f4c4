"""The qcow2 metadata core, sans I/O (the file side lives in blkpy.backends.qcow2).

header     header fields, feature bits, extensions: parse/validate/serialize
l2         L1/L2 entries (standard, zero, compressed, extended/subclusters)
refcount   refcount blocks of any width, refcount table entries
snapshot   the internal snapshot table
bitmaps    persistent bitmaps, as far as ``check`` needs them
cache      LRU of L2 tables / refcount blocks that never drops dirty ones
plan       the write/sync/resize/punch operations handed to the I/O layer
allocator  refcounts, cluster allocation, deferred frees, refcount table growth
metadata   guest → host mapping, write planning, discard, crash-safe write-back
check      references vs refcounts (``image check``), refcount rebuild of dirty images
layout     the bytes of a new image (``image create``)
"""
