"""Data: webdataset shards (:mod:`.shards`, :mod:`.make_shards`), the bundled sample set
(:mod:`.samples`), streaming pipelines (:mod:`.pipeline`), object-shape banks (:mod:`.shapes`) and
the MISATO loader (:mod:`.misato`). Submodules are imported on demand."""
