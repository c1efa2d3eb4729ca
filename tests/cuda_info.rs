//! What `ddpm-cuda info --device cuda` says of a device, on planned devices (nothing runs; no GPU needed):
//! which embedded image a compute capability loads, and which attention passes fit its shared memory.

use ddpm_cuda::backend::cuda::{cuda_version, image_for, CudaBackend, Planned};

const ARCHS: &str = "sm_90a,sm_80,compute_90";

#[test]
fn each_compute_capability_loads_the_image_that_runs_there() {
    assert!(image_for(9, 0, ARCHS).contains("own machine code (sm_90a)"));
    assert!(image_for(8, 0, ARCHS).contains("own machine code (sm_80)"));
    // sm_80's machine code runs on the later minors of 8 (RTX 30 and 40, A10, L4, L40S).
    for minor in [6, 7, 9] {
        assert!(
            image_for(8, minor, ARCHS).contains("machine code of sm_80"),
            "8.{minor}"
        );
    }
    // Newer majors compile the portable PTX; older devices have nothing.
    assert!(image_for(10, 0, ARCHS).contains("PTX of compute_90"));
    assert!(image_for(12, 0, ARCHS).contains("PTX of compute_90"));
    assert!(image_for(7, 5, ARCHS).contains("nothing"));
    assert_eq!(cuda_version(12020), "12.2");
    assert_eq!(cuda_version(13000), "13.0");
}

#[test]
fn attention_is_described_by_what_fits_the_shared_memory() {
    let text = |be: &CudaBackend| -> String {
        be.describe_paths()
            .iter()
            .map(|(l, t)| format!("{l}: {t}\n"))
            .collect()
    };
    // H100: 227 KiB, every pass on tensor cores at every width; v8 selectable.
    let h100 = text(&CudaBackend::planned(Planned::H100));
    assert!(h100.contains("the forward on tensor cores at every width up to 256, the backward on tensor cores at every width up to 256"), "{h100}");
    assert!(h100.contains("v8"), "{h100}");
    // A100: 163 KiB, the forward (132 KiB at c = 256) fits, the backward (187-190 KiB) does not at 256.
    let a100 = text(&CudaBackend::planned(Planned::A100));
    assert!(
        a100.contains("the forward on tensor cores at every width up to 256"),
        "{a100}"
    );
    assert!(
        a100.contains("the backward on tensor cores up to"),
        "{a100}"
    );
    assert!(!a100.contains("v8"), "{a100}");
    // An sm_86 / sm_89 card: about 99 KiB a block.
    let mut small = CudaBackend::planned(Planned::A100);
    small.limit_shared_memory(99 << 10);
    let s = text(&small);
    assert!(
        s.contains("99 KiB") && s.contains("the forward on tensor cores up to"),
        "{s}"
    );
}
