"""The CIFAR-3 FC-vs-CNN study: everything the DVC stages in `stages/` call, in layers.

params, errors, cli, files   the base every layer uses: params.yaml, one-line errors, how a stage runs, atomic writes
data/         CIFAR-10 in, CIFAR-3 out: download, archive checks, safe unpickling, split files
training/     models, speed tricks, device and numerics, the seed-group trainer, what training writes
tracking/     MLflow: the store and its runs, provenance, what each stage logs
reporting/    metrics files, the comparison, figures, the offline plots page
studies/      a study file's trials as DVC experiments on Ray, and its report
reproduction/ rerun a recorded run and judge it against its record
team/         a team's shared stack on loopback (PostgreSQL, S3, MLflow server)
bench/        the training-speed benchmark and the CUDA op audit
"""
