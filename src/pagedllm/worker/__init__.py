"""Workers: turn a SchedulerOutput into sampled tokens (model runner, sampler)."""
