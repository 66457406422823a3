"""The developer benchmark (`python benchmarks/bench.py`): speed measured side by side with
the pipeline users would otherwise write.

Each measurement runs in its own subprocess, so that peak memory is that measurement's own
(process peak RSS on CPU, `max_memory_allocated` on GPU) and no cache from another
measurement helps it. The model is `flan-t5-small-random` (the real geometry: speed does not
depend on weight values); batches come from the real SST-2 and SAMSum data.

Sections:
  matmul     the machine's measured matmul peak (fp32 and bf16)
  train      training throughput per method and batch shape: peftlab's loop vs the reference
             (Seq2SeqTrainer + peft + DataCollatorForSeq2Seq), model FLOPs utilisation (MFU)
  mfu        full fine-tuning's MFU by batch size, fp32 and bf16, SST-2 shapes
  numerics   the same batches in the same order: per-step fp32 loss, peftlab vs reference
  bf16       bf16 autocast vs fp32 training, same seed and batches: speed, loss-curve drift,
             metric
  bf16_eval  one fp32-trained checkpoint evaluated in fp32 and in bf16: agreement, metric, time
  batching   length-grouped vs random batches: padding, speed, and the metric after training
  eval       SST-2 by rank classification vs generation (ours, in the default evaluation
             precision and in fp32, and the reference's `predict_with_generate`); SAMSum
             generation throughput
  cell       one ablation cell end to end (200 steps, evaluation every 50 on 200 validation
             examples, the full test split): peftlab vs the reference pipeline, wall time
  grid       runs per hour with N runs at once through the study runner: sharing one GPU
             (`--runs-per-gpu N`), or on CPU N worker processes splitting the cores
             (`peftlab run STUDY --workers N`; N up to the number of CPUs)
  pack       runs per hour of the same cells unpacked and in packs of P (`peftlab run
             --pack P`), per method and shape, with the MFU of their training steps; on a GPU
             also unpacked with N runs sharing it; and a built-in study's wall time per P
"""
