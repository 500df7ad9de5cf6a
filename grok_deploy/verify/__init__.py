"""The verify room: the reference run (golden outputs, `generate`), the comparison of served
outputs with it over gRPC, and the report (rules, json/md/png). Imports serving's client and
everything below it.
"""
