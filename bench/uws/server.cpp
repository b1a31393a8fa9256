// A uWebSockets pub/sub server that speaks the protocol v1 subset ringway-bench uses
// (welcome, subscribe -> subscribed, message frames, POST /v1/publish), so the same
// scenarios run against it and ringway in one session. One uWS App per thread, each
// with its own SO_REUSEPORT listener; a publish is handed to every thread's loop.
// Settings match ringway's defaults where both have one: 64 KiB messages, 256 KiB
// of backpressure and then a close, 60 s idle timeout with automatic pings.
//
// Build: bench/uws/build.sh (needs the uWebSockets and uSockets sources).
// Run:   uws-server <ws port> <admin port> [threads]
#include "App.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct PerSocket {};

static std::mutex apps_lock;
static std::vector<std::pair<uWS::Loop *, uWS::App *>> apps;
static std::atomic<unsigned long> next_conn{0}, next_seq{0};

// The value of "field":"…" in a flat JSON object (no escapes in our keys or topics).
static std::string_view string_field(std::string_view json, std::string_view field) {
    std::string key = "\"" + std::string(field) + "\":\"";
    size_t at = json.find(key);
    if (at == std::string_view::npos) return {};
    at += key.size();
    size_t end = json.find('"', at);
    return end == std::string_view::npos ? std::string_view{} : json.substr(at, end - at);
}

static void publish_everywhere(std::string topic, std::string frame) {
    std::lock_guard<std::mutex> g(apps_lock);
    for (auto [loop, app] : apps) {
        loop->defer([app, topic, frame]() { app->publish(topic, frame, uWS::OpCode::TEXT, false); });
    }
}

// POST /v1/publish {"topic":"T","data":<JSON>}: frames the message once per process.
static std::string on_publish(std::string_view body) {
    std::string_view topic = string_field(body, "topic");
    size_t at = body.find("\"data\":");
    size_t end = body.rfind('}');
    if (topic.empty() || at == std::string_view::npos || end == std::string_view::npos || end < at + 7) return {};
    std::string_view data = body.substr(at + 7, end - (at + 7));
    auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                  std::chrono::system_clock::now().time_since_epoch()).count();
    std::string id = std::to_string(ms) + "-" + std::to_string(next_seq++);
    std::string frame = "{\"type\":\"message\",\"topic\":\"" + std::string(topic) + "\",\"id\":\"" + id +
                        "\",\"data\":" + std::string(data) + "}";
    publish_everywhere(std::string(topic), std::move(frame));
    return "{\"id\":\"" + id + "\"}";
}

static void serve(int ws_port, int admin_port) {
    uWS::App app;
    app.ws<PerSocket>("/ws", {
        .compression = uWS::DISABLED,
        .maxPayloadLength = 64 * 1024,
        .idleTimeout = 60,
        .maxBackpressure = 256 * 1024,
        .closeOnBackpressureLimit = true,
        .resetIdleTimeoutOnSend = false,
        .sendPingsAutomatically = true,
        .open = [](auto *ws) {
            std::string w = "{\"type\":\"welcome\",\"conn\":\"" + std::to_string(next_conn++) + "\",\"node\":\"uws\"}";
            ws->send(w, uWS::OpCode::TEXT);
        },
        .message = [](auto *ws, std::string_view msg, uWS::OpCode) {
            std::string_view op = string_field(msg, "op");
            std::string topic(string_field(msg, "topic"));
            if (op == "subscribe") {
                ws->subscribe(topic);
                ws->send("{\"type\":\"subscribed\",\"topic\":\"" + topic + "\"}", uWS::OpCode::TEXT);
            } else if (op == "unsubscribe") {
                ws->unsubscribe(topic);
                ws->send("{\"type\":\"unsubscribed\",\"topic\":\"" + topic + "\"}", uWS::OpCode::TEXT);
            }
        },
    });
    app.post("/v1/publish", [](auto *res, auto *) {
        res->onAborted([]() {});
        std::string body;
        res->onData([res, body = std::move(body)](std::string_view chunk, bool last) mutable {
            body.append(chunk);
            if (!last) return;
            std::string reply = on_publish(body);
            if (reply.empty()) {
                res->writeStatus("400 Bad Request")->end("{\"error\":\"bad_json\"}");
            } else {
                res->writeHeader("Content-Type", "application/json")->end(reply);
            }
        });
    });
    app.get("/healthz", [](auto *res, auto *) { res->end("ok\n"); });
    app.get("/readyz", [](auto *res, auto *) { res->end("ok\n"); });
    for (int port : {ws_port, admin_port}) {
        app.listen("127.0.0.1", port, [port](auto *token) {
            if (!token) {
                std::fprintf(stderr, "uws-server: cannot listen on %d\n", port);
                std::exit(1);
            }
        });
    }
    {
        std::lock_guard<std::mutex> g(apps_lock);
        apps.emplace_back(uWS::Loop::get(), &app);
    }
    app.run();
}

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s <ws port> <admin port> [threads]\n", argv[0]);
        return 64;
    }
    int ws_port = std::atoi(argv[1]), admin_port = std::atoi(argv[2]);
    unsigned threads = argc > 3 ? (unsigned) std::atoi(argv[3]) : std::thread::hardware_concurrency();
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < (threads ? threads : 1); i++) pool.emplace_back(serve, ws_port, admin_port);
    std::fprintf(stderr, "uws-server ready ws=%d admin=%d threads=%u\n", ws_port, admin_port, threads);
    for (auto &t : pool) t.join();
}
