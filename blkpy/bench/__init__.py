"""`blkpy bench`: blkpy against its real peers (fio, qemu-img) in one run."""
