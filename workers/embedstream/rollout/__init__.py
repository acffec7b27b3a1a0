"""Model rollout: a new model version beside the old one, backfilled, switched over in one step, rolled back.

``embedstream.aliases`` holds which version readers use (one document, replaced whole); ``kafka`` places the
new version's consumer group and measures its lag; ``compare`` sets two versions side by side;
``steps`` are the commands' logic (start, switch, rollback, retire); ``cli`` registers
``embedstream rollout``. Readers resolve an alias through ``aliases.resolve`` once per request, so a
request sees one version whole (``ops/search.py``, ``stores/feast_store.py``). ``docs/rollout.md``.
"""
