"""Ingestion: bringing an untrusted source in safely. Imports only `core`.

Source kinds (folders, CSV/Parquet tables, archives, URLs, buckets) and what each may do (`confine`,
`urls`, `url_fetch`, `archives`, `layout`), copying into `data/raw`, per-file facts and manifest rows,
and `images`, the one guarded image loader every later layer decodes through.
"""
