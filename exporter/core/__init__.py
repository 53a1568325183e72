"""The core every stage imports, and that imports no stage: errors (one exception family → exit codes), typed
(config/result dataclasses ↔ data), ui (console output), artifacts (the workdir layout, hashing, atomic writes,
manifests), profiles (the deployment profiles, declared once in data/profiles.yaml), versions (the version table
the images and manifests are pinned to) and stage (the skeleton export, quantize and build-engine share).

Dependencies run one way: `exporter.core` → nothing of r1deploy's; `quantize` → `exporter.core`; the other stages
and the CLI → anything below them. tests/test_import_graph.py holds that."""
