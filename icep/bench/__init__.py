"""The comparison and benchmark scripts the README and ``experiments/RESULTS.md`` cite, installed
with icep: ``icep compare`` (:mod:`.compare`), ``icep paper`` (:mod:`.paper`), ``icep bench
finetune`` (:mod:`.finetune`) and ``icep bench pipelines`` (:mod:`.pipelines`). The files under
``experiments/`` run the same code from a checkout."""
