import Foundation
import PF2LoRA
import Prometheus

/// GET /metrics: a swift-prometheus registry in the Prometheus text format.
///
/// The HTTP transport's own events (requests by route and outcome, time to first token, inter-token
/// latency) are recorded as they happen; the method layer's counters and gauges (which the stdio
/// transport's `stats` shows too) are copied into the registry at each scrape.
final class HTTPMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    /// Seconds from the request to its first token.
    let ttft: ValueHistogram
    /// Mean seconds between the tokens of a request.
    let interToken: ValueHistogram
    /// Scrapes one at a time (a counter copied from the method layer is reset, then set).
    private let scrape = NSLock()

    static let buckets: [Double] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
    static let requestsHelp = "HTTP requests by route and outcome (ok, or the error status)."

    /// A metric's full name (the unit, if any, is part of it) and its help line.
    static func named(_ name: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
    }

    init() {
        ttft = registry.makeValueHistogram(descriptor: Self.named("pf2lora_time_to_first_token_seconds", "Time from an HTTP request to its first token."),
                                           buckets: Self.buckets)
        interToken = registry.makeValueHistogram(descriptor: Self.named("pf2lora_inter_token_latency_seconds", "Mean time between the tokens of an HTTP request."),
                                                 buckets: Self.buckets)
    }

    func request(route: String, outcome: String) {
        registry.makeCounter(descriptor: Self.named("pf2lora_http_requests_total", Self.requestsHelp), labels: [("route", route), ("outcome", outcome)]).increment()
    }

    /// The inter-token latency of a finished request.
    func finished(_ g: GenerateResult) {
        if g.usage.completionTokens > 1 { interToken.record(g.timing.decodeMs / 1000 / Double(g.usage.completionTokens - 1)) }
    }

    /// The registry's text, with the method layer's counters and gauges as they are now.
    func render(_ core: ServingCore) -> [UInt8] {
        scrape.lock(); defer { scrape.unlock() }
        let st = core.stats()
        func counter(_ name: String, _ help: String, _ v: Int) {
            let c = registry.makeCounter(descriptor: Self.named(name, help))
            c.reset(); c.increment(by: Int64(max(0, v)))
        }
        func gauge(_ name: String, _ help: String, _ v: Double) { registry.makeGauge(descriptor: Self.named(name, help)).set(v) }
        counter("pf2lora_requests_total", "Protocol requests of both transports (stdio lines and generate calls).", st.requests)
        counter("pf2lora_generate_completed_total", "Generate requests answered (cancelled ones included).", st.completed)
        counter("pf2lora_generate_cancelled_total", "Generate requests answered as cancelled (cancel, client gone away, drain timeout).", st.cancelled)
        counter("pf2lora_generate_failed_total", "Generate requests that failed.", st.failed)
        counter("pf2lora_prompt_tokens_total", "Prompt tokens fed.", st.promptTokens)
        counter("pf2lora_completion_tokens_total", "Tokens generated.", st.generatedTokens)
        counter("pf2lora_forward_steps_total", "Forward steps of the continuous batch.", st.steps)
        gauge("pf2lora_queue_depth", "Requests waiting beyond the batch.", Double(st.queued))
        gauge("pf2lora_batch_rows", "Sequences running in the batch.", Double(st.running))
        gauge("pf2lora_mean_batch_rows", "Mean rows per forward step since start.", st.meanBatchRows)
        if let c = st.adapterCache {
            counter("pf2lora_adapter_cache_hits_total", "Adapter cache hits.", c.hits)
            counter("pf2lora_adapter_cache_misses_total", "Adapter cache misses.", c.misses)
            counter("pf2lora_adapter_cache_evictions_total", "Adapter cache evictions.", c.evictions)
            gauge("pf2lora_adapter_cache_bytes", "Bytes of decompressed adapters cached.", Double(c.bytes))
            gauge("pf2lora_adapter_cache_entries", "Adapters cached.", Double(c.entries))
        }
        counter("pf2lora_training_jobs_total", "Training requests started (personalize, train_local, evaluate_local).", core.training.jobsStarted)
        gauge("pf2lora_training_running", "1 while a training request runs.", st.training == nil ? 0 : 1)
        gauge("pf2lora_resident_bytes", "Resident set size.", Double(st.rssBytes))
        var out: [UInt8] = []
        registry.emit(into: &out)
        return out
    }
}
