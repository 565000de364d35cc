//! The short soak in `make test` (one fault cycle, `Cycle::SHORT`; `make soak` runs minutes): mixed load on a
//! plain sidecar and a close-relay sidecar side by side while the app is SIGKILLed and
//! restarted, Envoy drains and un-drains, and a bad plugin configuration is pushed and
//! withdrawn. close-relay must lose no request the plain sidecar served, leak no marker,
//! corrupt no body, stay up and keep its memory flat.

#[test]
fn one_fault_cycle_loses_nothing_the_baseline_serves() {
    let soak = e2e::soak::run(12, e2e::soak::Cycle::SHORT);
    eprintln!("[envoy {}] soak ({}): {}", e2e::envoy_version(), e2e::layout().as_str(), soak.report());
    if let Err(why) = e2e::soak::verdict(&soak) {
        panic!("{why}\n{}", soak.report());
    }
}
