{{/*
The fleetserve alert rules, as Prometheus rule groups.

One source for two outputs: the PrometheusRule (templates/prometheusrule.yaml)
and the plain files/alerts.yaml for users without the Prometheus operator,
which hack/render_alerts.py writes from this template with the default values
(tests/unit/test_alerts_rules.py fails when the two differ).

Label contract the expressions rely on (see docs/runbooks.md "Scraping"):
- server series carry `namespace`, `pod` (from service discovery) and `model`
  (set by the server); server targets are scraped under job .Values.alerts.serverJob;
- operator series carry `namespace` and `name` of the LLMDeployment (the
  operator sets them, so scrape it with honor_labels) under job .Values.alerts.operatorJob.
Annotations are Prometheus templates: {{`{{ $labels.x }}`}} is escaped so Helm leaves it alone.
*/}}
{{- define "fleetserve.alertGroups" -}}
{{- $a := .Values.alerts -}}
{{- $rb := $a.runbookBaseURL -}}
- name: fleetserve-server
  rules:
    - alert: FleetserveKVCacheNearlyFull
      expr: max by (namespace, model, pod) (fleetserve_kv_cache_usage_ratio) > {{ $a.kvCacheNearlyFull.threshold }}
      for: {{ $a.kvCacheNearlyFull.for }}
      labels:
        severity: {{ $a.kvCacheNearlyFull.severity }}
      annotations:
        summary: KV cache of {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} is nearly full
        description: >-
          The KV cache of pod {{`{{ $labels.pod }}`}} (model {{`{{ $labels.model }}`}}, namespace
          {{`{{ $labels.namespace }}`}}) is {{`{{ $value | humanizePercentage }}`}} full, above
          {{ mulf 100 $a.kvCacheNearlyFull.threshold }}% for {{ $a.kvCacheNearlyFull.for }}: new requests wait and
          running ones get preempted.
        runbook_url: {{ $rb }}#fleetservekvcachenearlyfull
    - alert: FleetserveQueueBacklog
      expr: sum by (namespace, model) (fleetserve_requests_waiting) > {{ $a.queueBacklog.threshold }}
      for: {{ $a.queueBacklog.for }}
      labels:
        severity: {{ $a.queueBacklog.severity }}
      annotations:
        summary: Requests for model {{`{{ $labels.model }}`}} in {{`{{ $labels.namespace }}`}} are queueing
        description: >-
          {{`{{ $value }}`}} requests for model {{`{{ $labels.model }}`}} in namespace
          {{`{{ $labels.namespace }}`}} are waiting for a batch slot (more than {{ $a.queueBacklog.threshold }}
          for {{ $a.queueBacklog.for }}): the fleet is behind its load.
        runbook_url: {{ $rb }}#fleetservequeuebacklog
    - alert: FleetservePreemptionsRising
      expr: sum by (namespace, model) (rate(fleetserve_preemptions_total[5m])) > {{ $a.preemptions.ratePerSecond }}
      for: {{ $a.preemptions.for }}
      labels:
        severity: {{ $a.preemptions.severity }}
      annotations:
        summary: Model {{`{{ $labels.model }}`}} in {{`{{ $labels.namespace }}`}} keeps preempting sequences
        description: >-
          Servers of model {{`{{ $labels.model }}`}} in namespace {{`{{ $labels.namespace }}`}} preempt
          {{`{{ printf "%.2f" $value }}`}} sequences/s (more than {{ $a.preemptions.ratePerSecond }}/s for
          {{ $a.preemptions.for }}): the KV cache is too small for the running batch.
        runbook_url: {{ $rb }}#fleetservepreemptionsrising
    - alert: FleetserveTimeToFirstTokenHigh
      expr: >-
        histogram_quantile(0.99, sum by (namespace, model, le)
        (rate(fleetserve_time_to_first_token_seconds_bucket[5m]))) > {{ $a.ttftP99.thresholdSeconds }}
      for: {{ $a.ttftP99.for }}
      labels:
        severity: {{ $a.ttftP99.severity }}
      annotations:
        summary: p99 time to first token of model {{`{{ $labels.model }}`}} in {{`{{ $labels.namespace }}`}} is high
        description: >-
          The p99 time to first token of model {{`{{ $labels.model }}`}} in namespace
          {{`{{ $labels.namespace }}`}} is {{`{{ $value | humanizeDuration }}`}}, above
          {{ $a.ttftP99.thresholdSeconds }}s for {{ $a.ttftP99.for }}.
        runbook_url: {{ $rb }}#fleetservetimetofirsttokenhigh
    - alert: FleetserveServerTargetDown
      expr: up{job="{{ $a.serverJob }}"} == 0
      for: {{ $a.targetDown.for }}
      labels:
        severity: {{ $a.targetDown.severity }}
      annotations:
        summary: fleetserve server {{`{{ $labels.namespace }}/{{ $labels.pod }}`}} cannot be scraped
        description: >-
          Prometheus has failed to scrape /metrics of server pod {{`{{ $labels.pod }}`}} in namespace
          {{`{{ $labels.namespace }}`}} (job {{`{{ $labels.job }}`}}, {{`{{ $labels.instance }}`}}) for
          {{ $a.targetDown.for }}: the pod is down or hung, and the autoscaler is blind to it too.
        runbook_url: {{ $rb }}#fleetserveservertargetdown
    {{- $slo := $a.ttftSLO }}
    {{- $le := $slo.targetBucket }}
    {{- range $w := list $slo.fast $slo.slow }}
    - alert: {{ $w.alertName }}
      # Multi-window burn rate (Google SRE workbook): the share of requests whose first token took
      # longer than the target, over a long and a short window, both above burnRate x the error
      # budget (1 - objective). The short window makes the alert stop soon after the burn stops.
      expr: >-
        (
        1 - sum by (namespace, model) (rate(fleetserve_time_to_first_token_seconds_bucket{le="{{ $le }}"}[{{ $w.longWindow }}]))
        / sum by (namespace, model) (rate(fleetserve_time_to_first_token_seconds_count[{{ $w.longWindow }}]))
        > {{ $w.burnRate }} * (1 - {{ $slo.objective }})
        )
        and on (namespace, model)
        (
        1 - sum by (namespace, model) (rate(fleetserve_time_to_first_token_seconds_bucket{le="{{ $le }}"}[{{ $w.shortWindow }}]))
        / sum by (namespace, model) (rate(fleetserve_time_to_first_token_seconds_count[{{ $w.shortWindow }}]))
        > {{ $w.burnRate }} * (1 - {{ $slo.objective }})
        )
      for: {{ $w.for }}
      labels:
        severity: {{ $w.severity }}
      annotations:
        summary: Model {{`{{ $labels.model }}`}} in {{`{{ $labels.namespace }}`}} burns its time-to-first-token error budget
        description: >-
          {{`{{ $value | humanizePercentage }}`}} of the first tokens of model {{`{{ $labels.model }}`}} in namespace
          {{`{{ $labels.namespace }}`}} took longer than {{ $le }}s over the last {{ $w.longWindow }} (and over
          {{ $w.shortWindow }}): {{ $w.burnRate }} times the error budget of the {{ mulf 100 $slo.objective }}% objective,
          which at this rate is spent in {{ $w.budgetSpentIn }}.
        runbook_url: {{ $rb }}#{{ lower $w.alertName }}
    {{- end }}
    - alert: FleetserveKVCacheEvictionsRising
      # Pressure evictions free cached prefix blocks to make room for running sequences; a steady
      # rate means the prefix cache is thrashing (blocks are evicted before they are reused).
      expr: >-
        sum by (namespace, model) (rate(fleetserve_kv_cache_evictions_total{reason="pressure"}[{{ $a.kvCacheEvictions.window }}]))
        > {{ $a.kvCacheEvictions.blocksPerSecond }}
      for: {{ $a.kvCacheEvictions.for }}
      labels:
        severity: {{ $a.kvCacheEvictions.severity }}
      annotations:
        summary: The prefix cache of model {{`{{ $labels.model }}`}} in {{`{{ $labels.namespace }}`}} is thrashing
        description: >-
          Servers of model {{`{{ $labels.model }}`}} in namespace {{`{{ $labels.namespace }}`}} evict
          {{`{{ printf "%.1f" $value }}`}} cached KV blocks/s under memory pressure (more than
          {{ $a.kvCacheEvictions.blocksPerSecond }}/s for {{ $a.kvCacheEvictions.for }}): shared prompt prefixes are
          dropped before they are reused, so prompts are recomputed.
        runbook_url: {{ $rb }}#fleetservekvcacheevictionsrising
    - alert: FleetserveOutputLogprobDrift
      # The output-quality signal: with sampling the same prompt has many valid answers, so a damaged
      # model (a bad quantization, a swapped checkpoint, a broken chat template) shows only as a shift
      # of the output's distribution. Median over the fleet's requests of each request's mean token
      # log-probability (exported negated, as fleetserve_output_token_nll_nats) in the last window, against the same window one offset earlier; only with
      # enough requests in both (no data a day ago, a new fleet: silent).
      {{- $d := $a.outputDrift }}
      {{- $b := printf "fleetserve_output_token_nll_nats_bucket[%s]" $d.window }}
      {{- $c := printf "fleetserve_output_token_nll_nats_count[%s]" $d.window }}
      expr: >-
        abs(
          histogram_quantile(0.5, sum by (namespace, model, le) (rate({{ $b }})))
          - histogram_quantile(0.5, sum by (namespace, model, le) (rate({{ $b }} offset {{ $d.offset }})))
        ) > {{ $d.logprobShift }}
        and on (namespace, model) sum by (namespace, model) (increase({{ $c }})) >= {{ $d.minRequests }}
        and on (namespace, model) sum by (namespace, model) (increase({{ $c }} offset {{ $d.offset }})) >= {{ $d.minRequests }}
      for: {{ $d.for }}
      labels:
        severity: {{ $d.severity }}
      annotations:
        summary: The outputs of model {{`{{ $labels.model }}`}} in {{`{{ $labels.namespace }}`}} changed
        description: >-
          The median mean token log-probability of model {{`{{ $labels.model }}`}}'s outputs in namespace
          {{`{{ $labels.namespace }}`}} over the last {{ $d.window }} is {{`{{ printf "%.2f" $value }}`}} nats away from
          its level {{ $d.offset }} earlier (more than {{ $d.logprobShift }} for {{ $d.for }}): the model now answers
          differently — check for a changed checkpoint, quantization, chat template or sampling default.
        runbook_url: {{ $rb }}#fleetserveoutputlogprobdrift
    - alert: FleetserveOutputEntropyDrift
      # The companion signal: the mean entropy of the model's next-token distribution over the fleet's
      # outputs (how sure the model is, whatever the clients' sampling), last window against the same
      # window one offset earlier; measured to move more than the logprob median for a coarse
      # quantization and a wrong chat template (BENCHMARKS.md "Output statistics").
      {{- $e := $a.outputEntropyDrift }}
      {{- $w := printf "[%s]" $e.window }}
      {{- $ws := printf "[%s] offset %s" $e.window $e.offset }}
      expr: >-
        abs(
          sum by (namespace, model) (rate(fleetserve_output_mean_token_entropy_nats_sum{{ $w }}))
          / sum by (namespace, model) (rate(fleetserve_output_mean_token_entropy_nats_count{{ $w }}))
          - sum by (namespace, model) (rate(fleetserve_output_mean_token_entropy_nats_sum{{ $ws }}))
          / sum by (namespace, model) (rate(fleetserve_output_mean_token_entropy_nats_count{{ $ws }}))
        ) > {{ $e.shift }}
        and on (namespace, model) sum by (namespace, model) (increase(fleetserve_output_mean_token_entropy_nats_count{{ $w }})) >= {{ $e.minRequests }}
        and on (namespace, model) sum by (namespace, model) (increase(fleetserve_output_mean_token_entropy_nats_count{{ $ws }})) >= {{ $e.minRequests }}
      for: {{ $e.for }}
      labels:
        severity: {{ $e.severity }}
      annotations:
        summary: Model {{`{{ $labels.model }}`}} in {{`{{ $labels.namespace }}`}} is more or less certain of its outputs than a {{ $e.offset }} ago
        description: >-
          The mean next-token entropy of model {{`{{ $labels.model }}`}}'s outputs in namespace
          {{`{{ $labels.namespace }}`}} over the last {{ $e.window }} is {{`{{ printf "%.2f" $value }}`}} nats away from its
          level {{ $e.offset }} earlier (more than {{ $e.shift }} for {{ $e.for }}): the model now answers
          differently — check for a changed checkpoint, quantization, chat template or sampling default.
        runbook_url: {{ $rb }}#fleetserveoutputentropydrift
- name: fleetserve-router
  rules:
    - alert: FleetserveRequestsHeldTooLong
      # The router pods (spec.router) of one Service held requests at every evaluation for the
      # threshold: no ready replica took them for that long (a scale-from-zero or node provisioning
      # that does not end). The value is how many are held now.
      expr: max by (namespace, service) (fleetserve_router_requests_held{job="{{ $a.routerJob }}"}) > 0
      for: {{ $a.requestsHeld.threshold }}
      labels:
        severity: {{ $a.requestsHeld.severity }}
      annotations:
        summary: Requests to {{`{{ $labels.namespace }}/{{ $labels.service }}`}} have been held for {{ $a.requestsHeld.threshold }} with no ready replica
        description: >-
          The router of Service {{`{{ $labels.service }}`}} in namespace {{`{{ $labels.namespace }}`}} has held
          requests without a break for {{ $a.requestsHeld.threshold }} ({{`{{ $value }}`}} now): no server replica
          became ready for them (Pending pods, a GPU node still provisioning, a model still loading). Clients are
          waiting; past spec.router.holdTimeoutSeconds they get 503.
        runbook_url: {{ $rb }}#fleetserverequestsheldtoolong
- name: fleetserve-operator
  rules:
    - alert: FleetserveFleetAtMaxReplicas
      # The value is the queue per replica; `and` keeps it and only adds the at-the-maximum condition.
      expr: >-
        (max by (namespace, name) (fleetserve_operator_observed_queue_length)
        / on (namespace, name) max by (namespace, name) (fleetserve_operator_desired_replicas)
        > {{ $a.fleetAtMaxReplicas.queuePerReplica }})
        and on (namespace, name)
        (max by (namespace, name) (fleetserve_operator_desired_replicas)
        >= on (namespace, name) max by (namespace, name) (fleetserve_operator_max_replicas))
      for: {{ $a.fleetAtMaxReplicas.for }}
      labels:
        severity: {{ $a.fleetAtMaxReplicas.severity }}
      annotations:
        summary: LLMDeployment {{`{{ $labels.namespace }}/{{ $labels.name }}`}} is at maxReplicas and still backlogged
        description: >-
          LLMDeployment {{`{{ $labels.name }}`}} in namespace {{`{{ $labels.namespace }}`}} runs its
          autoscaling.maxReplicas and still has {{`{{ printf "%.2f" $value }}`}} queued or running requests
          per replica (more than {{ $a.fleetAtMaxReplicas.queuePerReplica }} for {{ $a.fleetAtMaxReplicas.for }}):
          the autoscaler cannot add capacity.
        runbook_url: {{ $rb }}#fleetservefleetatmaxreplicas
    - alert: FleetserveAutoscalerPinnedQueueGrowing
      # The value is the queue's growth per minute; `and` adds the at-the-maximum condition.
      expr: >-
        (max by (namespace, name) (deriv(fleetserve_operator_observed_queue_length[{{ $a.autoscalerPinned.window }}])) * 60
        > {{ $a.autoscalerPinned.queueGrowthPerMinute }})
        and on (namespace, name)
        (max by (namespace, name) (fleetserve_operator_desired_replicas)
        >= on (namespace, name) max by (namespace, name) (fleetserve_operator_max_replicas))
      for: {{ $a.autoscalerPinned.for }}
      labels:
        severity: {{ $a.autoscalerPinned.severity }}
      annotations:
        summary: LLMDeployment {{`{{ $labels.namespace }}/{{ $labels.name }}`}} is pinned at maxReplicas while its queue grows
        description: >-
          The autoscaler of LLMDeployment {{`{{ $labels.name }}`}} in namespace {{`{{ $labels.namespace }}`}} wants
          maxReplicas and its queue keeps growing by {{`{{ printf "%.2f" $value }}`}} requests/minute (over
          {{ $a.autoscalerPinned.window }}, for {{ $a.autoscalerPinned.for }}): load outgrows the most capacity it may add.
        runbook_url: {{ $rb }}#fleetserveautoscalerpinnedqueuegrowing
    - alert: FleetserveProvisioningTooSlow
      # No replica Ready while the operator wants some (a scale-from-zero, or every pod Pending) for
      # longer than a node and a model load should take; a fleet whose model does not fit has its
      # own alert (FleetserveMemoryDoesNotFit) and is left out.
      expr: >-
        (max by (namespace, name) (fleetserve_operator_desired_replicas) > 0)
        and on (namespace, name)
        (max by (namespace, name) (fleetserve_operator_ready_replicas) == 0)
        unless on (namespace, name)
        (max by (namespace, name) (fleetserve_operator_condition{type="MemoryFits", status="False"}) == 1)
      for: {{ $a.provisioning.limit }}
      labels:
        severity: {{ $a.provisioning.severity }}
      annotations:
        summary: LLMDeployment {{`{{ $labels.namespace }}/{{ $labels.name }}`}} has no Ready replica after {{ $a.provisioning.limit }}
        description: >-
          LLMDeployment {{`{{ $labels.name }}`}} in namespace {{`{{ $labels.namespace }}`}} wants
          {{`{{ $value }}`}} replicas and none has been Ready for {{ $a.provisioning.limit }} (the provisioning limit):
          its pods are Pending (no node with a free GPU), pulling, or still loading the model, and requests
          to it wait or fail.
        runbook_url: {{ $rb }}#fleetserveprovisioningtooslow
    - alert: FleetserveReplicasNotReady
      expr: >-
        max by (namespace, name) (fleetserve_operator_desired_replicas)
        > on (namespace, name) max by (namespace, name) (fleetserve_operator_ready_replicas)
      for: {{ $a.replicasNotReady.for }}
      labels:
        severity: {{ $a.replicasNotReady.severity }}
      annotations:
        summary: LLMDeployment {{`{{ $labels.namespace }}/{{ $labels.name }}`}} has fewer ready replicas than desired
        description: >-
          LLMDeployment {{`{{ $labels.name }}`}} in namespace {{`{{ $labels.namespace }}`}} wants
          {{`{{ $value }}`}} replicas but fewer are Ready, for {{ $a.replicasNotReady.for }}: pods are
          unschedulable (no free GPU), crash-looping or still loading.
        runbook_url: {{ $rb }}#fleetservereplicasnotready
    - alert: FleetserveMemoryDoesNotFit
      expr: max by (namespace, name) (fleetserve_operator_condition{type="MemoryFits", status="False"}) == 1
      for: {{ $a.memoryDoesNotFit.for }}
      labels:
        severity: {{ $a.memoryDoesNotFit.severity }}
      annotations:
        summary: LLMDeployment {{`{{ $labels.namespace }}/{{ $labels.name }}`}} does not fit in GPU memory
        description: >-
          LLMDeployment {{`{{ $labels.name }}`}} in namespace {{`{{ $labels.namespace }}`}} has
          MemoryFits=False: its model, quantization and maxModelLen do not fit the requested GPU memory,
          so the operator runs no pods for it. `kubectl describe llmd {{`{{ $labels.name }}`}}` gives the numbers.
        runbook_url: {{ $rb }}#fleetservememorydoesnotfit
    - alert: FleetserveOperatorScrapeErrors
      expr: sum by (namespace, name, reason) (rate(fleetserve_operator_scrape_errors_total[5m])) > {{ $a.scrapeErrors.ratePerSecond }}
      for: {{ $a.scrapeErrors.for }}
      labels:
        severity: {{ $a.scrapeErrors.severity }}
      annotations:
        summary: The operator cannot scrape the servers of {{`{{ $labels.namespace }}/{{ $labels.name }}`}}
        description: >-
          The fleetserve operator's scrapes of the server pods of {{`{{ $labels.namespace }}/{{ $labels.name }}`}}
          fail with reason {{`{{ $labels.reason }}`}} at {{`{{ printf "%.2f" $value }}`}}/s for
          {{ $a.scrapeErrors.for }}: autoscaling decisions hold the current size while it lasts.
        runbook_url: {{ $rb }}#fleetserveoperatorscrapeerrors
    - alert: FleetserveOperatorReconcileErrors
      # The operator counts failed reconciles per LLMDeployment and error class
      # (fleetserve_operator.metrics.ERRORS); one alert per failing LLMDeployment.
      expr: sum by (namespace, name) (rate(fleetserve_operator_reconcile_errors_total[5m])) > {{ $a.reconcileErrors.ratePerSecond }}
      for: {{ $a.reconcileErrors.for }}
      labels:
        severity: {{ $a.reconcileErrors.severity }}
      annotations:
        summary: The fleetserve operator keeps failing to reconcile LLMDeployment {{`{{ $labels.namespace }}/{{ $labels.name }}`}}
        description: >-
          Reconciles of LLMDeployment {{`{{ $labels.namespace }}/{{ $labels.name }}`}} fail at
          {{`{{ printf "%.2f" $value }}`}}/s for {{ $a.reconcileErrors.for }}: its children are not
          updated. The operator's log and the LLMDeployment's Warning events say why
          (fleetserve_operator_reconcile_errors_total's error label gives the class).
        runbook_url: {{ $rb }}#fleetserveoperatorreconcileerrors
    - alert: FleetserveOperatorDown
      expr: absent(up{job="{{ $a.operatorJob }}"} == 1)
      for: {{ $a.targetDown.for }}
      labels:
        severity: {{ $a.operatorDown.severity }}
        # absent() of a comparison has no labels; name the job so routing can tell what is down.
        job: {{ $a.operatorJob }}
      annotations:
        summary: The fleetserve operator is down or not scraped
        description: >-
          No target of job {{ $a.operatorJob }} has been up for {{ $a.targetDown.for }}: LLMDeployments
          are neither reconciled nor autoscaled.
        runbook_url: {{ $rb }}#fleetserveoperatordown
{{- end -}}
