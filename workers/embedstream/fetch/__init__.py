"""Images by reference: ``s3://bucket/key`` and ``http(s)://host/path`` fetched for the image modality.

- ``references``: a reference parsed and checked against the allow-lists (schemes, hosts, buckets);
- ``guard``: the address check after DNS resolution, on every hop (SSRF);
- ``http_source`` (httpx) and ``s3_source`` (boto3): one fetch, streamed under the byte cap;
- ``budget``: bytes in flight; ``fetcher``: concurrency, retries, outcomes, outage probes;
- ``outcomes``: ``Failed`` (a dead letter with its reason) and ``Away`` (an outage: hold, not dead-letter).

Nothing is imported here: a worker that fetches nothing needs neither httpx nor boto3 (the
``formats`` extra), and reads ``references`` and ``outcomes`` alone.
"""
