import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTPTypes

/// Hummingbird's HTTP/1 channel with a header timeout and a watch on the client going away.
///
/// A request's header must arrive within `headerTimeout` seconds of its first byte, or the connection
/// is closed (a slow-loris client dripping header bytes holds a connection for that long at most,
/// whatever the idle timeout, which Hummingbird resets only on whole request parts). The body has its
/// own timeout (`bodyTimeout`, answered 408 by the transport).
///
/// Hummingbird allows remote half-closure, so a client that closes its socket while its request
/// waits for an answer only sends an end of input: nothing is written yet, so nothing fails and the
/// channel stays open. `ClientWatch` tells the transport of that end of input (or of the channel
/// closing), which cancels the request's generation.
struct GuardedHTTP1Channel: ServerChildChannel {
    typealias Value = HTTP1Channel.Value
    let inner: HTTP1Channel
    let headerTimeout: TimeAmount

    init(responder: @escaping HTTPChannelHandler.Responder, configuration: HTTP1Channel.Configuration, headerTimeout: TimeAmount) {
        inner = HTTP1Channel(responder: responder, configuration: configuration)
        self.headerTimeout = headerTimeout
    }

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        let clock = HeaderClock(timeout: headerTimeout)
        do {
            // First in the pipeline: it sees the bytes before the HTTP decoder.
            try channel.pipeline.syncOperations.addHandler(HeaderBytesHandler(clock))
        } catch {
            return channel.eventLoop.makeFailedFuture(error)
        }
        var configuration = inner.configuration
        let extra = configuration.additionalChannelHandlers
        configuration.additionalChannelHandlers = { extra() + [HeaderPartsHandler(clock)] }
        return HTTP1Channel(responder: inner.responder, configuration: configuration).setup(channel: channel, logger: logger)
    }

    func handle(value: Value, logger: Logger) async {
        await inner.handle(value: value, logger: logger)
    }
}

/// One connection's header deadline and the watchers of its client going away; used only on its event loop.
final class HeaderClock: @unchecked Sendable {
    let timeout: TimeAmount
    /// True between requests: the next byte starts a header.
    var awaitingHead = true
    var deadline: Scheduled<Void>?
    /// The client closed its side (end of input) or the channel closed.
    var clientGone = false
    var watchers: [UInt64: @Sendable () -> Void] = [:]
    init(timeout: TimeAmount) { self.timeout = timeout }

    func cancel() { deadline?.cancel(); deadline = nil }

    func goneAway() {
        guard !clientGone else { return }
        clientGone = true
        let w = watchers.values
        watchers = [:]
        for f in w { f() }
    }
}

/// Calls back when the client of a connection goes away (end of input or the channel closing).
enum ClientWatch {
    /// Runs `f` once the client of `channel` has gone away (at once if it already has); `unwatch` with the same id forgets it.
    static func watch(_ channel: any Channel, id: UInt64, _ f: @escaping @Sendable () -> Void) {
        channel.eventLoop.execute {
            guard let h = try? channel.pipeline.syncOperations.handler(type: HeaderBytesHandler.self), !h.clock.clientGone else { f(); return }
            h.clock.watchers[id] = f
        }
    }

    static func unwatch(_ channel: any Channel, id: UInt64) {
        channel.eventLoop.execute {
            if let h = try? channel.pipeline.syncOperations.handler(type: HeaderBytesHandler.self) { h.clock.watchers[id] = nil }
        }
    }
}

/// Starts the header deadline at the first byte of a request; sees the client go away.
final class HeaderBytesHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let clock: HeaderClock
    init(_ clock: HeaderClock) { self.clock = clock }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if clock.awaitingHead && clock.deadline == nil {
            let channel = context.channel
            let c = clock
            clock.deadline = context.eventLoop.scheduleTask(in: clock.timeout) {
                c.deadline = nil
                if c.awaitingHead { channel.close(promise: nil) }
            }
        }
        context.fireChannelRead(data)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed { clock.goneAway() }
        context.fireUserInboundEventTriggered(event)
    }

    func channelInactive(context: ChannelHandlerContext) {
        clock.goneAway()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) { clock.cancel(); clock.goneAway() }
}

/// Stops the header deadline when the decoder has a whole header; re-arms at the end of the request.
final class HeaderPartsHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    let clock: HeaderClock
    init(_ clock: HeaderClock) { self.clock = clock }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head: clock.awaitingHead = false; clock.cancel()
        case .body: break
        case .end: clock.awaitingHead = true
        }
        context.fireChannelRead(data)
    }

    func handlerRemoved(context: ChannelHandlerContext) { clock.cancel() }
}
