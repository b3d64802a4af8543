"""Load and soak suite: locust (headless, loopback, bounded) against a real ``loraswap serve``.

One command::

    python -m loadtests.load [--quick] [--soak-minutes M] [--users 1,2,4,8] [--out results.json]

starts the server on 127.0.0.1 (tiny-sd, 32 px, 4 steps, ``max_queue`` 4, a device cache tier that holds
about 12 of the adapters), registers 50 adapters over HTTP, and drives it with locust: a ramp to find
saturation, runs at 1×, 2× and 4× the saturating users, base-only vs the Zipf mix, and a soak sampling
the server's RSS. It prints a table and writes the figures to JSON. See docs/reliability.md.
"""

# Layout: ``cli`` (arguments, JSON, report), ``suite`` (the phases in order, the post-check), ``phases``
# (one locust process per phase), ``locustfile`` (the user), ``mix`` (the Zipf sampler), ``stats`` (the
# figures), ``server`` (the server subprocess and its RSS), ``adapters`` (files and registration),
# ``report`` (the table and the verdicts).

SUMMARY = (__doc__ or "").split("\n")[0]
