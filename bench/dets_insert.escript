#!/usr/bin/env escript
%%! -noinput
%% The seed's own disk store, Erlang DETS, inserting sessions one at a time from one process:
%% the floor of bench/dets.py. Prints the inserts per second of one run (the final sync
%% included: DETS buffers writes in its process, and an insert is durable only once synced).
%%
%%     escript bench/dets_insert.escript COUNT DIRECTORY
-mode(compile).

main([CountText, Dir]) ->
    Count = list_to_integer(CountText),
    File = filename:join(Dir, "sessions.DETS"),
    _ = file:delete(File),
    {ok, Table} = dets:open_file(sessions, [{file, File}, {type, set}]),
    Now = erlang:system_time(millisecond),
    Metadata = #{<<"user_id">> => <<"user123">>, <<"auth_method">> => <<"api_key">>,
                 <<"theme">> => <<"dark">>, <<"language">> => <<"en">>},
    Ids = [new_id() || _ <- lists:seq(1, Count)],
    Start = erlang:monotonic_time(microsecond),
    lists:foreach(
        fun(Id) ->
            Session = #{id => Id, created_at => Now, last_accessed => Now,
                        timeout_ms => 3600000, metadata => Metadata},
            ok = dets:insert(Table, {Id, Session})
        end,
        Ids),
    ok = dets:sync(Table),
    Elapsed = erlang:monotonic_time(microsecond) - Start,
    ok = dets:close(Table),
    io:format("~p~n", [Count * 1000000 / Elapsed]);
main(_) ->
    io:format(standard_error, "usage: dets_insert.escript COUNT DIRECTORY~n", []),
    halt(2).

%% 32 lowercase hex digits from 128 random bits, as the service's ids.
new_id() ->
    string:lowercase(binary:encode_hex(crypto:strong_rand_bytes(16))).
