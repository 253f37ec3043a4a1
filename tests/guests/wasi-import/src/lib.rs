//! Imports clocks from WASI and nothing from the gateway: the gateway must refuse it at
//! start-up and name both imports.

wit_bindgen::generate!({ path: "wit", world: "handler", generate_all });

struct Clocky;

impl Guest for Clocky {
    fn init() {
        let _ = wasi::clocks::wall_clock::now();
        let _ = wasi::clocks::monotonic_clock::now();
    }
}

export!(Clocky);
