"""`python -m training demo`: the whole product end to end on synthetic parts. run.py drives the
stages (data, train, export, station, conveyor, summary); station.py the broker, daemon and
conveyor; review.py the station page's review loop; report.py the scoring and pictures.
"""
