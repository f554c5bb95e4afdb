# one H100 capped at 24 GiB (session 38 call 1)
source .device/setup.sh && python3 -m pytest -p no:cacheprovider -o addopts="" -q -m cuda tests/test_mailbox.py tests/test_draft_joins.py
