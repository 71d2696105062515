// swift-tools-version: 6.1
import Foundation
import PackageDescription

// Swift targets baseline x86-64 (SSE2) by default, where the SIMD kernels run 10-20x slower than
// with AVX2 + FMA. Haswell (2013) is the floor we assume; PF2LORA_TARGET_CPU=native (or any LLVM CPU
// name) overrides it, PF2LORA_TARGET_CPU=generic turns it off.
// Such a build needs AVX2, FMA and F16C at run time: the CLI checks for them before anything else
// runs (PF2LORA_X86_64_V3, Sources/pf2lora/main.swift) and says what to do instead of dying of an
// illegal instruction.
#if arch(x86_64)
let targetCPU = ProcessInfo.processInfo.environment["PF2LORA_TARGET_CPU"] ?? "haswell"
let cpuFlags: [String] = targetCPU == "generic" ? [] : ["-target-cpu", targetCPU]
let cpuDefines: [SwiftSetting] = targetCPU == "generic" ? [] : [.define("PF2LORA_X86_64_V3")]
#else
let cpuFlags: [String] = []
let cpuDefines: [SwiftSetting] = []
#endif

let package = Package(
    name: "pf2lora",
    platforms: [.macOS(.v15)],   // Synchronization (Mutex, Atomic)
    products: [
        .library(name: "PF2LoRA", targets: ["PF2LoRA"]),
        .executable(name: "pf2lora", targets: ["pf2lora"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        // The OpenAI-compatible HTTP transport (Sources/PF2LoRAHTTP, docs/HTTP.md).
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        // GET /metrics of the HTTP transport (Prometheus text format).
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        // HTTPRequestPart for the header-timeout handlers (already a dependency of Hummingbird).
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
        // The HTTP server's graceful shutdown at the end of a drain (already a dependency of Hummingbird).
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // OpenBLAS through its C interface (cblas.h), found with pkg-config.
        .systemLibrary(
            name: "COpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"]), .brew(["openblas"])]
        ),
        // zstd for the adapter store's compressed files.
        .systemLibrary(
            name: "CZstd",
            pkgConfig: "libzstd",
            providers: [.apt(["libzstd-dev"]), .brew(["zstd"])]
        ),
        // The int8 dot products of q8_0 weights (x86 intrinsics Swift cannot express), chosen at
        // run time from the CPU's features, with a scalar path; see Sources/CQuant/include/CQuant.h.
        .target(
            name: "CQuant",
            cSettings: [.unsafeFlags(["-O3"])]
        ),
        // glibc's malloc_trim (not in Swift's Glibc module): a load that converts weights returns
        // the freed f32 temporaries to the OS (ServingBase.load).
        .target(name: "CMemory"),
        .target(
            name: "PF2LoRA",
            dependencies: ["COpenBLAS", "CZstd", "CQuant", "CMemory"],
            swiftSettings: [
                .unsafeFlags(["-Ounchecked"], .when(configuration: .release)),
                .unsafeFlags(cpuFlags),
            ]
        ),
        // `serve --http`: the OpenAI-compatible HTTP transport over the method layer of Serving/.
        // A target of its own so the library (and its tests of the method layer) builds without NIO.
        .target(
            name: "PF2LoRAHTTP",
            dependencies: [
                "PF2LoRA",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOHTTPTypes", package: "swift-nio-extras"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "pf2lora",
            dependencies: [
                "PF2LoRA",
                "PF2LoRAHTTP",
                "CQuant",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: cpuDefines
        ),
        // A helper the reliability tests run as a child process and SIGKILL mid-publish. Not a
        // product: `swift build --product pf2lora` and an install never include it; `swift test`
        // builds it (every target is built before the tests run).
        .executableTarget(
            name: "TestPublishLoop",
            dependencies: [
                "PF2LoRA",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Tests/TestPublishLoop"
        ),
        // The tests stay in Swift 5 mode: their helper threads share captured state with the test
        // body in ways the tests synchronize themselves; the library and the CLI are Swift 6.
        .testTarget(
            name: "PF2LoRATests",
            dependencies: ["PF2LoRA", "PF2LoRAHTTP"],
            exclude: ["Fixtures"],
            swiftSettings: [.swiftLanguageMode(.v5)]
        ),
    ],
    swiftLanguageModes: [.v6]
)
