"""The datapath: BPF loading and attaching (loader), typed map access (maps), raw bpf(2)
(bpfsys)."""
