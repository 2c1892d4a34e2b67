"""Running a recipe's stages as jobs: each job builds one registry entry, an executor only carries it.

`driver` walks the stage graph and hands every stage whose inputs are committed to a transport:
`local` (subprocesses in N slots on this machine) or `slurm` (submitit, with its local backend for
trying the path without a cluster). The registry's per-key locks keep two drivers from building an
entry twice; a job killed by its scheduler is resubmitted and resumes from its in-stage checkpoint.
"""
