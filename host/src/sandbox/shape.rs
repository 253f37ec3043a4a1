//! What a component will ask of each instance, read from its binary: the core instances,
//! memories and tables it creates and its linear memory at start. `gateway guest check`
//! reports it so that a plugin author can set the `guest_max_*` and `guest_memory_bytes`
//! limits before a connection is refused.

use wasmparser::{Parser, Payload};

/// WebAssembly page size.
const PAGE: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    /// Core module instances the component creates (counted by `guest_max_instances`).
    pub core_instances: u64,
    /// Memories its modules define (`guest_max_memories`).
    pub memories: u64,
    /// Tables its modules define (`guest_max_tables`).
    pub tables: u64,
    /// The defined memories' initial size, in bytes.
    pub initial_memory_bytes: u64,
}

/// The shape of `component`; `None` if it cannot be parsed (loading it reports why).
pub fn of(component: &[u8]) -> Option<Shape> {
    let mut shape = Shape::default();
    // Nested modules' sections come in the same stream, after their `ModuleSection`.
    for payload in Parser::new(0).parse_all(component) {
        match payload.ok()? {
            // Only instantiations make an instance; "from exports" ones only group names.
            Payload::InstanceSection(reader) => {
                for instance in reader {
                    if matches!(instance.ok()?, wasmparser::Instance::Instantiate { .. }) {
                        shape.core_instances += 1;
                    }
                }
            }
            Payload::MemorySection(reader) => {
                for memory in reader {
                    let memory = memory.ok()?;
                    let page = memory.page_size_log2.map_or(PAGE, |log2| 1 << log2);
                    shape.memories += 1;
                    shape.initial_memory_bytes += memory.initial.saturating_mul(page);
                }
            }
            Payload::TableSection(reader) => shape.tables += u64::from(reader.count()),
            _ => {}
        }
    }
    Some(shape)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_broken_binary_has_no_shape() {
        assert_eq!(super::of(b"not wasm"), None);
    }
}
