"""The selection client a training loop needs: ``AdaptiveSubset`` (api.py), the round protocol (rounds.py,
schedule.py), subsets (subsets.py), gradient summaries (summaries.py, layers.py), summary workers (workers.py),
data-parallel ranks (group.py), and Ray: connecting, starting the selector (cluster.py)."""
