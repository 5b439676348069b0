"""sslscale's launcher: where and how processes start (CLI, run environment, shard plan).

It never imports DeepSpeed or models; planning code is pure Python.
"""
