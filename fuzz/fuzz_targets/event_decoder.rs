//! Fuzzes the event decoder and the engine behind it: any line must decode or be rejected,
//! and a decoded event must be applied without a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sagawatch::engine::{Engine, MemoryState};
use sagawatch::event::Decoder;
use sagawatch::rules::RuleSet;

fn rules() -> &'static Arc<RuleSet> {
    static RULES: OnceLock<Arc<RuleSet>> = OnceLock::new();
    RULES.get_or_init(|| {
        let text = include_str!("../../rules/orders.yaml");
        Arc::new(sagawatch::rules::load_sources(&[("orders.yaml".into(), text.into())]).unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let rules = rules();
    let decoder = Decoder::new(rules, "time");
    let mut engine = Engine::new(Arc::clone(rules), MemoryState::new(), 0).with_lifecycle(true);
    let mut out = Vec::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(ev) = decoder.decode(line, Some("orders")) {
            engine.process(&ev, &mut out);
        }
    }
    engine.finish(&mut out);
});
